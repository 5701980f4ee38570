"""Looking at a compiled artifact from outside: ONNX export of its plans and `dsv4c inspect`.

These tools sit beside the driver (they may use its capture and lowering); only the CLI imports them.
"""
