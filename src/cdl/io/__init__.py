"""Files and formats: cdl's own model file, bytes and pickling (format), state-dict
files (.safetensors, .npz), and ONNX (cdl.io.onnx, reached as cdl.onnx; imported on
first use)."""
from .format import dumps, load, loads, save
from .state_files import load_state_dict_file, save_state_dict

__all__ = ["save", "load", "dumps", "loads", "load_state_dict_file", "save_state_dict"]
