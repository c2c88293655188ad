"""The seed's models, as the seed writes them: shared by the examples, the tests and the bench."""
from torch import nn


class Classifier(nn.Module):
    """The seed's classifier (fc1 784->512, fc2 512->256, fc3 256->10) with one ReLU module shared
    by two layers, the pattern bigmodel.optimize must recognise."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 512)
        self.fc2 = nn.Linear(512, 256)
        self.fc3 = nn.Linear(256, 10)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = x.view(-1, 784)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        x = self.fc3(x)
        return x
