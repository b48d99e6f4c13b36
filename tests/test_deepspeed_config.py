"""check_deepspeed_config refuses every config in which DeepSpeed would not run Scion as given."""

from __future__ import annotations

import pytest

from disco_ds.integrations.deepspeed_config import check_deepspeed_config, gradient_dtype_keys, resolve_auto

GOOD = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_clipping": 0.0,
    "zero_allow_untested_optimizer": True,
    "zero_optimization": {"stage": 2},
}


def test_good_configs_pass() -> None:
    check_deepspeed_config(GOOD)
    check_deepspeed_config({"train_micro_batch_size_per_gpu": 2})  # stage 0 needs no ZeRO flags
    check_deepspeed_config({**GOOD, "zero_force_ds_cpu_optimizer": False,
                            "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}})


@pytest.mark.parametrize(
    "change,match",
    [
        ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, r"'optimizer' section \(type='AdamW'\)"),
        ({"optimizer": {"type": "Muon"}}, r"'optimizer' section \(type='Muon'\)"),
        ({"zero_optimization": {"stage": 2, "round_robin_gradients": True}}, r"zero_optimization\.round_robin_gradients=true"),
        ({"zero_allow_untested_optimizer": False}, r"zero_allow_untested_optimizer=true"),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, r"zero_force_ds_cpu_optimizer=false"),
    ],
)
def test_refused_configs_name_the_key(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_deepspeed_config({**GOOD, **change})


def test_no_muon_trigger_in_our_classes() -> None:
    """DeepSpeed switches on its own Muon path for classes named *muon* or params with use_muon."""
    import torch

    from disco_ds import Scion, ScionLight, scion_param_groups

    for cls in (Scion, ScionLight):
        assert "muon" not in cls.__name__.lower()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    Scion(scion_param_groups(model, lr=0.1))
    assert not any(hasattr(p, "use_muon") for p in model.parameters())


def test_gradient_dtype_keys() -> None:
    assert gradient_dtype_keys("float32") == {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}
    assert gradient_dtype_keys("bfloat16") == {"data_types": {"grad_accum_dtype": "bf16"}, "communication_data_type": "bf16"}
    with pytest.raises(ValueError, match=r"grad_dtype='fp16' is not one of \['float32', 'bfloat16'\]"):
        gradient_dtype_keys("fp16")


def test_resolve_auto_takes_the_generated_value_or_drops_the_key() -> None:
    user = {"train_batch_size": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "overlap_comm": True}, "extra": {}}
    generated = {"train_batch_size": 64, "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}
    assert resolve_auto(user, generated) == {
        "train_batch_size": 64, "bf16": {"enabled": True},  # fp16 held only "auto": DeepSpeed's default
        "zero_optimization": {"stage": 2, "overlap_comm": True}, "extra": {},
    }
