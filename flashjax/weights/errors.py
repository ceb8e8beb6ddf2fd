"""The error every checkpoint problem is reported as."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, or holds a tensor of the wrong shape.

    The message always names the file and, where there is one, the tensor.
    """
