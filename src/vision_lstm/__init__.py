"""vision-lstm: the Vision-LSTM (ViL) backbone in plain PyTorch, with a CPU-friendly training tool."""
# First, before anything imports torch: glibc keeps freed memory for reuse, and OpenMP's waiting threads spin if no
# OpenMP runtime is loaded yet (runtime.py)
from .runtime import MALLOC_SETTING, OMP_WAIT_SETTING  # noqa: I001
from .cell import MLSTMState, init_state, mlstm, mlstm_chunkwise, mlstm_parallel, mlstm_recurrent, mlstm_step
from .convert import load_official_state_dict
from .errors import VilError
from .model import ViLConfig, VisionLSTM, create_model, list_models, model_config, register_model

__version__ = "0.1.0"
__all__ = [
    "MALLOC_SETTING", "MLSTMState", "OMP_WAIT_SETTING", "ViLConfig", "VilError", "VisionLSTM", "create_model",
    "init_state", "list_models", "load_official_state_dict", "mlstm", "mlstm_chunkwise", "mlstm_parallel",
    "mlstm_recurrent", "mlstm_step", "model_config", "register_model",
]
