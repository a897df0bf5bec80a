"""ForeAct: visual foresight for vision-language-action policies (mit-han-lab/foreact, arXiv 2602.12322) in JAX.

- `config`: `SanaConfig` and the SANA-1600M-512 preset.
- `sana`: ForeAct's image-edit SANA transformer; `generator`: transformer + view embedding (`VisualForesight`'s
  trainable part).
- `scheduler`: the flow DPM-Solver++ (inference) and flow-matching (training) schedules.
- `sampling`: 3-way / 2-way CFG sampling in one compiled program.
- `training`: the rectified-flow loss and the official CFG dropout.
- `weights`: the released `VisualForesight` layout (`transformer.*`, `view_embedding.*`, `vae.*`, `mllm_backbone.*`).
- `text`: the official caption features (chat prompt, left padding, 256 tokens, Gemma-2 hidden states + final cap).
- `planner`: the control loop (`Agent`, `ScriptedPlanner`, `VLMPlanner`, `GeneratorForesight`).
- `tabletop`: the toy world of experiments/foreact_tabletop.py.
See README.md in this folder for the official quirks kept and what is not done.
"""

from jaxeff.foreact.config import PRESETS, SANA_1600M_512, SanaConfig, preset
from jaxeff.foreact.generator import ForesightGenerator
from jaxeff.foreact.sampling import combine_guidance, sample
from jaxeff.foreact.sana import SanaEditTransformer
from jaxeff.foreact.scheduler import dpm_solver_step, flow_sigmas, train_schedule
from jaxeff.foreact.training import apply_cfg_dropout, cfg_dropout_masks, flow_matching_loss, training_draws
from jaxeff.foreact.weights import RELEASED, load_generator

__all__ = [
    "PRESETS", "RELEASED", "SANA_1600M_512", "ForesightGenerator", "SanaConfig", "SanaEditTransformer",
    "apply_cfg_dropout", "cfg_dropout_masks", "combine_guidance", "dpm_solver_step", "flow_matching_loss",
    "flow_sigmas", "load_generator", "preset", "sample", "train_schedule", "training_draws",
]
