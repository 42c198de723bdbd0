"""What gfs.prune does with the calibration data it is given: non-finite values are refused with a
message naming the calibration batch (never a gfs internal name like "x"); floating-point batches
of another dtype than the model's are converted to the model's dtype (the caller's tensors are
left as they are); a batch the model cannot run is a clean UnsupportedModelError with no
traceback printed."""

import pytest
import torch
import torch.nn as nn

from gfs.pruning import UnsupportedModelError, prune

pytestmark = pytest.mark.usefixtures("one_thread")


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1)
    )


def images(n=4, seed=0):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_calibration_data_name_the_batch(bad):
    x = images()
    xn = x.clone()
    xn[1, 2, 3, 4] = bad
    with pytest.raises(
        ValueError,
        match=r"calibration batch 1 \(of the calibration data passed to gfs\.prune\) "
        r"contains NaN or Inf \(first at index \(1, 2, 3, 4\)\)",
    ) as info:
        prune(cnn(), [x, xn], keep=2, progress=False)
    assert "x contains" not in str(info.value)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat([x, xn])), batch_size=4)
    with pytest.raises(ValueError, match=r"calibration batch 1 \(of the calibration data passed"):
        prune(cnn(), loader, keep=2, progress=False)
    with pytest.raises(
        ValueError,
        match=r"calibration \(the tensor passed to gfs\.prune\) contains NaN or Inf "
        r"\(first at index \(1, 2, 3, 4\)\)",
    ):
        prune(cnn(), xn, keep=2, progress=False)


def test_activations_that_overflow_on_finite_data_name_the_group():
    model = cnn()
    with torch.no_grad():
        model[0].weight.fill_(1e38)  # finite weights and inputs, infinite activations
    with pytest.raises(
        ValueError,
        match=r"group '0': the input of its consumer '2' .*contains NaN or Inf.*"
        r"calibration data are finite",
    ) as info:
        prune(model, images(), keep=2, progress=False)
    assert "x contains" not in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_calibration_of_another_float_dtype_is_converted_to_the_models(dtype, capfd):
    model = cnn()
    x32 = images().to(dtype).float()  # values exactly representable in both dtypes
    base = prune(model, x32, keep=3, progress=False)
    x = x32.to(dtype)
    kept = x.clone()
    for calibration in (x, [x[:2], x[2:]], [(x, torch.zeros(4, dtype=torch.long))]):
        result = prune(model, calibration, keep=3, progress=False)
        assert [r.kept.tolist() for r in result.report] == [r.kept.tolist() for r in base.report]
        assert all(torch.equal(a.scale, b.scale) for a, b in zip(result.report, base.report, strict=True))
        assert next(result.model.parameters()).dtype == torch.float32
    assert x.dtype == dtype and torch.equal(x, kept)  # the caller's data are not modified
    assert "Traceback" not in capfd.readouterr().err


def test_a_batch_the_model_cannot_run_is_a_clean_error(capfd):
    with pytest.raises(UnsupportedModelError, match=r"calibration batch.*Conv2d.*expected input.*3 channels") as info:
        prune(cnn(), torch.randn(2, 5, 8, 8), keep=2, progress=False)
    assert "ShapeProp" not in str(info.value)
    assert "Traceback" not in capfd.readouterr().err  # torch.fx's shape propagation prints one; not here
