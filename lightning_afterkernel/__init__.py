"""lightning-afterkernel: the after kernel, initial kernel and conjugate kernel of a network, in Lightning.

Subpackages: ``kernels`` (eNTK, conjugate kernel, metrics), ``svm`` (hard-margin SVM on kernels),
``models`` (the paper's networks), ``data`` (binary image tasks), ``callbacks`` (``AfterKernelCallback``).
"""

__version__ = "0.1.0"
