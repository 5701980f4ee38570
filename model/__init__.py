"""DeepSeek-V4's decode math and its formats: the semantic definition everything else is checked against.

config and presets (the model's dimensions), numerics (every rounding choice), quant (FP8/MXFP4/e8m0 number
formats), layout, checkpoint and synthetic (the released checkpoint format, read and written), layers,
attention and step (the functional decode step). This room imports nothing else of dsv4c.
"""
