"""Evaluator: the model zoo, the data loaders and the baselines measured against.

``data`` loads the reference datasets (n-bit parity, Fashion-MNIST IDX files, CIFAR-10
python batches) as numpy arrays; ``models`` exposes every network as a function of one
flat parameter vector with an optional leading run axis; ``backprop`` is the plain SGD
baseline; ``gradient_angle`` measures how well an estimate points along the true
gradient. Importing this package starts no service and touches no file: import the
submodules you need.
"""
