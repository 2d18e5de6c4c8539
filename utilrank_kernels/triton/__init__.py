"""Triton kernels and their launchers, one file per op. Imported lazily by the ops: importing the
package never needs a GPU."""
