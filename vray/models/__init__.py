"""Building models: resolving a source (tiny:, a folder, s3:// or a hub id), loading it at a precision or in 4-bit,
applying LoRA, and generating. Model code that vray implements itself lives in `vray/models/<family>/`
(configuration, modeling and processing of one family together)."""


def register_families() -> None:
    """Make the model families vray implements itself (`vray/models/<family>/`) known to transformers' Auto
    classes; every place that builds a model or processor from a folder or a config calls this first."""
    import vray.models.nvila_lite  # noqa: F401 - registers on import
