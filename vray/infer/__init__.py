"""Using a trained run without a server: resolving it for inference, the model engine, generation with boxes
mapped back to image pixels, evaluation, predictions, merged export and `vray.load`.

`vray.serve` builds its Ray Serve deployments on this package; nothing here imports Ray.
"""
