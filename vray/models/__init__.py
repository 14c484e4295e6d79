"""Building models: resolving a source (tiny:, a folder, s3:// or a hub id), loading it at a precision or in 4-bit,
applying LoRA, and generating. Model code that vray implements itself lives in `vray/models/<family>/`
(configuration, modeling and processing of one family together)."""
