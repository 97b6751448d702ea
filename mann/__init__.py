"""mann: memory-augmented neural networks (NTM, DNC, LSTM baseline), algorithmic tasks, training.

Pure PyTorch: nothing here imports Ray or MLflow.
"""

__version__ = "0.1.0"
