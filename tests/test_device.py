import pytest
import torch

from lib import device as dev


def test_auto_is_cpu_here_and_cpu_autocast_is_bf16_never_fp16(monkeypatch):
    monkeypatch.delenv(dev.ENV_VAR, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    d = dev.pick_device()
    assert d == torch.device("cpu")
    assert dev.autocast_dtype(d) == torch.bfloat16
    assert not dev.needs_grad_scaler(d)
    with dev.autocast(d):
        y = torch.randn(4, 8) @ torch.randn(8, 4)
    assert y.dtype == torch.bfloat16


def test_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.delenv(dev.ENV_VAR, raising=False)
    monkeypatch.setattr(dev, "_mps_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.pick_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.pick_device(None) == torch.device("mps")


def test_environment_variable_overrides_auto_but_not_an_explicit_parameter(monkeypatch):
    monkeypatch.setenv(dev.ENV_VAR, "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.pick_device("auto") == torch.device("cpu")
    monkeypatch.setenv(dev.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=r"\$MEDIMG_DEVICE.*bogus.*valid choices"):
        dev.pick_device()
    assert dev.pick_device("cpu") == torch.device("cpu")


def test_unavailable_or_unknown_devices_fail_clearly(monkeypatch):
    monkeypatch.delenv(dev.ENV_VAR, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        dev.pick_device("cuda")
    with pytest.raises(ValueError, match="MPS is not available"):
        dev.pick_device("mps")
    with pytest.raises(ValueError, match="valid choices: auto"):
        dev.pick_device("gpu")


@pytest.mark.parametrize("capability,expected", [((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_cuda_autocast_dtype_follows_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    d = torch.device("cuda")
    assert dev.autocast_dtype(d) == expected
    assert dev.needs_grad_scaler(d) == (expected == torch.float16)


def test_amp_dtype_can_be_forced_on_a_gpu_never_fp16_on_a_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setenv(dev.AMP_ENV_VAR, "float16")  # an H100 checks the T4's fp16 + loss-scaling path
    assert dev.autocast_dtype(torch.device("cuda")) == torch.float16 and dev.needs_grad_scaler(torch.device("cuda"))
    assert dev.autocast_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setenv(dev.AMP_ENV_VAR, "half")
    with pytest.raises(ValueError, match=r"\$MEDIMG_AMP_DTYPE: unknown autocast dtype 'half'; valid choices"):
        dev.autocast_dtype(torch.device("cuda"))
