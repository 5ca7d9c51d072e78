"""vision-lstm: the Vision-LSTM (ViL) backbone in plain PyTorch, with a CPU-friendly training tool."""
from .cell import MLSTMState, init_state, mlstm, mlstm_chunkwise, mlstm_parallel, mlstm_recurrent, mlstm_step
from .convert import load_official_state_dict
from .errors import VilError
from .model import ViLConfig, VisionLSTM, create_model, list_models, model_config, register_model
from .runtime import MALLOC_SETTING  # importing the package lets glibc keep freed memory for reuse (runtime.py)

__version__ = "0.1.0"
__all__ = [
    "MALLOC_SETTING", "MLSTMState", "ViLConfig", "VilError", "VisionLSTM", "create_model", "init_state", "list_models",
    "load_official_state_dict", "mlstm", "mlstm_chunkwise", "mlstm_parallel", "mlstm_recurrent", "mlstm_step",
    "model_config", "register_model",
]
