"""Figures of the code before an optimisation, recorded once and kept as data (not re-run: the old code is gone
from the package, and running an old commit's source beside the current one ties the benchmark to the history).

Each entry names the commit whose code it measured, where and when; the tables print it beside the live figures
as a recorded figure, so a reader compares a ratio measured then with one measured now.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Recorded:
    ratio: float  # against the same run's reference (VTDE, the CLIP processor, the global-stage step)
    commit: str
    where: str  # machine and date of the measurement
    value: float | None = None  # the figure itself, in the unit of its table, where the table shows one

    def label(self, name: str) -> str:
        return f"{name}, before (recorded at {self.commit}, {self.where})"


XEON_AMX = "Intel Xeon with AMX, 2 cores, 2026-11-28"

# The ROI processor's layers kept nn.Linear's init (std 1): saturated pool scores and subnormal gradients made the
# ViT's backward GEMMs 40–70 % slower (NOTES.md, optimisation 1). Ratio of the step to VTDE's.
POOL_K4_STEP = Recorded(ratio=1.35, commit="b914bdc", where=XEON_AMX)

# The image processor before uint8-until-normalisation and one-channel grayscale (optimisation 2): images/s on 16
# images of 512 px; ratio to transformers' CLIP processor on the same images.
PROCESSOR = {
    "grayscale": Recorded(value=337, ratio=1.26, commit="b914bdc", where=XEON_AMX),
    "grayscale + 3 ROI crops each": Recorded(value=196, ratio=0.73, commit="b914bdc", where=XEON_AMX),
    "RGB": Recorded(value=347, ratio=1.27, commit="b914bdc", where=XEON_AMX),
}

# The ROI stage before caption deduplication and the caption cache: every caption slot through the frozen text
# tower. Seconds per step; ratio to the global-stage step.
EVERY_CAPTION_ENCODED = Recorded(
    value=38.97, ratio=2.13, commit="deb4046", where="Intel Xeon with AMX, 2 cores, 2026-12-01"
)
