import pytest
import torch

from lcq.config import make_config
from lcq.optim import lr_multiplier, newton_schulz
from lcq.train import out_of_time


def test_out_of_time_uses_the_slower_of_average_and_last_step():
    flag = torch.zeros(())
    assert not out_of_time(flag, elapsed=90.0, steps=9, last_step_s=10.0, budget_s=100.0)  # 90 + 10 = 100: fits
    assert out_of_time(flag, elapsed=90.0, steps=9, last_step_s=10.5, budget_s=100.0)  # a slow last step
    assert out_of_time(flag, elapsed=91.0, steps=7, last_step_s=1.0, budget_s=100.0)  # average 13 s


def test_lr_schedule_known_answers():
    cfg = make_config("tiny", iterations=100, warmdown_frac=0.5, lr_warmup_steps=0, max_wallclock_seconds=110.0,
                      train_reserve_seconds=10.0)
    assert lr_multiplier(0, 0.0, cfg) == 1.0
    assert lr_multiplier(50, 0.0, cfg) == 1.0
    assert lr_multiplier(75, 0.0, cfg) == pytest.approx(0.5)
    assert lr_multiplier(10, 75.0, cfg) == pytest.approx(0.5)  # the wallclock, not the step count, is binding
    assert lr_multiplier(100, 0.0, cfg) == 0.0
    warm = make_config("tiny", lr_warmup_steps=4)
    assert [lr_multiplier(s, 0.0, warm) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_newton_schulz_orthogonalises():
    g = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(newton_schulz(g, 5))
    assert 0.6 < s.min() and s.max() < 1.3  # the quintic's band (Muon); a plain normalisation would spread widely
