"""The command line's small promises: --version, a description for every command, help texts without
reST markup or references to files a user does not have, torch's dtype names, no zero batch sizes."""

import pytest

from utilrank_kernels import __version__
from utilrank_kernels.cli import COMMANDS, build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"utilrank {__version__}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_plain_description(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]  # after the usage block
    assert not description.lstrip().startswith(("options:", "positional")), f"{command} has no description"
    assert "``" not in text and "DESIGN" not in text and ":func:" not in text, command


def test_dtype_names_of_torch_are_accepted():
    args = build_parser().parse_args(["bench", "--dtype", "float32,bfloat16,half"])
    assert args.dtype == ["fp32", "bf16", "fp16"]
    assert build_parser().parse_args(["export", "--dtype", "float16"]).dtype == "fp16"


@pytest.mark.parametrize("argv", [["bench", "--batch-sizes", "0"], ["bench", "--batch-sizes", "8,-1"],
                                  ["compress", "--target-batch", "0"], ["compress", "--finetune-batch-size", "0"]])
def test_zero_sizes_are_refused_with_the_option_named(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1 and ">= 1" in err  # one line, no usage block
    assert err.count(argv[1]) == 1 and err.startswith(f"utilrank {argv[0]}: error: argument {argv[1]}: ")
