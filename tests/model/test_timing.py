"""Stage timing: the pipeline's sections add up to the stages every report names."""

from __future__ import annotations

from app.model.checkpoint import random_pipeline
from app.model.config import DEMO
from app.model.timing import PIPELINE_STAGES, Stage, StageTimer, scale_section


def test_stage_seconds_sum_the_transformer_over_its_scales_and_name_every_pipeline_stage() -> None:
    timer = StageTimer()
    timer.seconds.update({scale_section(0): 0.25, scale_section(1): 0.5, Stage.SAMPLING: 0.125})
    assert timer.stage_seconds() == {
        Stage.TRANSFORMER: 0.75,
        Stage.SAMPLING: 0.125,
        Stage.LATENT: 0.0,
        Stage.DECODE: 0.0,
    }


def test_the_pipeline_times_every_scale_and_each_of_its_stages() -> None:
    pipe = random_pipeline(DEMO, seed=0)
    timer = StageTimer()
    pipe.generate([1], seeds=[3], timer=timer)
    scales = {scale_section(si) for si in range(len(DEMO.var.patch_nums))}
    assert set(timer.seconds) == scales | set(PIPELINE_STAGES) - {Stage.TRANSFORMER}
    assert all(timer.stage_seconds()[stage] > 0 for stage in PIPELINE_STAGES)
    assert Stage.ENCODE not in PIPELINE_STAGES  # timed by the service's API
