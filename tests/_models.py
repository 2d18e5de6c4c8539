"""Tiny models shared by the tests."""

import torch
from torch import nn


class TokenMLP(nn.Module):
    """Linear layers on 3-D token tensors, a pooled head, and a branch that never runs."""

    def __init__(self, d=12, hidden=20, classes=5):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.head = nn.Linear(d, classes)
        self.unused = nn.Linear(d, d)

    def forward(self, x):  # [B, T, d]
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x.mean(1))


class ConvNet(nn.Module):
    def __init__(self, c=3, classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 8, (3, 1), padding=(2, 0), dilation=(2, 1), padding_mode="reflect")
        self.conv3 = nn.Conv2d(8, 6, 3, padding="same", bias=False)
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.head = nn.Linear(6, classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = self.depthwise(torch.relu(self.conv3(x)))
        return self.head(x.mean((2, 3)))
