"""The FID Inception network's wiring, weight conversion and preprocessing, with random weights.

References, independent of the code under test:
- ``data/fid_inception_torch_shapes.json``: the name and shape of every tensor of pytorch-fid's
  FID Inception state dict (``fid_inception_v3()``'s module, buffers ``num_batches_tracked``
  left out), written from pytorch-fid 0.3.0 + torchvision 0.28;
- ``torch.nn.functional.interpolate`` for the half-pixel bilinear resize;
- pytorch-fid itself (when importable) for the whole network on random weights.
"""

import json
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffjax.evaluation import inception

FIXTURE = pathlib.Path(__file__).parent / "data" / "fid_inception_torch_shapes.json"
TORCH_SHAPES = {k: tuple(v) for k, v in json.loads(FIXTURE.read_text()).items()}


def _random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in pytorch-fid's naming, scaled so activations neither die nor explode."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in TORCH_SHAPES.items():
        if name.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            value = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)  # He init keeps the scale
        elif name.endswith("bn.weight"):
            value = rng.uniform(0.8, 1.2, size=shape)
        elif name.endswith("running_var"):
            value = rng.uniform(0.5, 2.0, size=shape)
        elif name == "fc.weight":
            value = rng.normal(size=shape) / np.sqrt(shape[1])
        else:  # bn.bias, running_mean, fc.bias
            value = 0.2 * rng.normal(size=shape)
        out[name] = value.astype(np.float32)
    return out


@pytest.fixture(scope="module")
def state_dict():
    return _random_state_dict()


@pytest.fixture(scope="module")
def variables(state_dict):
    return inception.torch_state_dict_to_variables(state_dict)


@pytest.fixture(scope="module")
def inception_fn():
    # One jitted function (one compile for [2, 16, 16, 3] uint8) shared by the network tests.
    return inception.make_inception_fn("pytorch_fid")


def _images(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("size_in,size_out", [(16, 299), (7, 3), (300, 299), (5, 5)])
def test_half_pixel_resize_matches_torch_interpolate(size_in, size_out):
    x = np.random.default_rng(0).normal(size=(size_in, size_in + 1))
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x)[None, None], size=(size_out, size_out), mode="bilinear"
    )[0, 0].numpy()  # align_corners=False is torch's default
    rh = inception.resize_matrix(size_in, size_out, "half_pixel")
    rw = inception.resize_matrix(size_in + 1, size_out, "half_pixel")
    np.testing.assert_allclose(rh @ x @ rw.T, ref, rtol=0, atol=1e-12)  # both float64


def test_legacy_tf1_resize_by_hand():
    # TF1 resize_bilinear(align_corners=False): source = dst * in / out, clamped at the edge.
    # 2 -> 4: sources 0, 0.5, 1, 1.5 -> [a, (a + b) / 2, b, b].
    np.testing.assert_allclose(
        inception.resize_matrix(2, 4, "legacy"), [[1, 0], [0.5, 0.5], [0, 1], [0, 1]]
    )
    # 3 -> 2: sources 0 and 1.5 -> [x0, (x1 + x2) / 2] (no antialiasing).
    np.testing.assert_allclose(inception.resize_matrix(3, 2, "legacy"), [[1, 0, 0], [0, 0.5, 0.5]])
    with pytest.raises(ValueError, match="unknown convention 'cubic'"):
        inception.resize_matrix(3, 2, "cubic")


def test_preprocess_scales_and_repeats_grey():
    black = np.zeros((1, 8, 8, 1), np.uint8)
    white = np.full((1, 8, 8, 1), 255, np.uint8)
    for mode, lo, hi in [("tf1", -1.0, 127.0 / 128.0), ("pytorch_fid", -1.0, 1.0)]:
        out_lo, out_hi = (np.asarray(inception.preprocess(x, mode)) for x in (black, white))
        assert out_lo.shape == (1, 299, 299, 3)
        np.testing.assert_allclose(out_lo, lo, atol=1e-6)
        np.testing.assert_allclose(out_hi, hi, atol=1e-6)
    with pytest.raises(ValueError, match="unknown preprocessing 'clean'; allowed: tf1"):
        inception.preprocess(black, "clean")
    with pytest.raises(ValueError, match=r"\[B, H, W, 1 or 3\]"):
        inception.preprocess(np.zeros((1, 8, 8, 2), np.uint8))


# ----------------------------------------------------------------------------- weights


def test_conversion_maps_every_tensor(state_dict, variables, tmp_path):
    flat = inception.expected_shapes()
    assert len(flat) == len(TORCH_SHAPES)  # one Flax variable per torch tensor
    assert sum(np.prod(s) for s in flat.values()) == sum(np.prod(s) for s in TORCH_SHAPES.values())
    # Layouts: conv [O, I, kh, kw] -> [kh, kw, I, O]; fc [out, in] -> [in, out].
    conv = variables["params"]["Mixed_7c"]["branch3x3_2b"]["conv"]["kernel"]
    w = state_dict["Mixed_7c.branch3x3_2b.conv.weight"]  # [384, 384, 3, 1]
    assert conv.shape == (3, 1, 384, 384)
    assert conv[2, 0, 5, 7] == w[7, 5, 2, 0]
    np.testing.assert_array_equal(
        variables["batch_stats"]["Mixed_6e"]["branch_pool"]["bn"]["var"],
        state_dict["Mixed_6e.branch_pool.bn.running_var"],
    )
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], state_dict["fc.weight"].T)

    inception.save_inception_variables(tmp_path / "w.npz", variables)
    loaded = inception.load_inception_variables(tmp_path / "w.npz")
    np.testing.assert_array_equal(
        loaded["params"]["fc"]["kernel"], variables["params"]["fc"]["kernel"]
    )


def test_conversion_rejects_wrong_state_dicts(state_dict, tmp_path):
    missing = {k: v for k, v in state_dict.items() if k != "Mixed_5b.branch1x1.conv.weight"}
    with pytest.raises(ValueError, match="1 missing.*Mixed_5b/branch1x1/conv/kernel"):
        inception.torch_state_dict_to_variables(missing)
    aux = dict(state_dict, **{"AuxLogits.fc.weight": np.zeros((1000, 768))})
    with pytest.raises(ValueError, match="1 unexpected.*AuxLogits/fc/kernel"):
        inception.torch_state_dict_to_variables(aux)
    torchvision_head = dict(state_dict, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
    with pytest.raises(ValueError, match=r"wrong shape.*fc/kernel \(2048, 1000\)"):
        inception.torch_state_dict_to_variables(torchvision_head)
    # Batch counters are ignored.
    inception.torch_state_dict_to_variables(
        dict(state_dict, **{"Conv2d_1a_3x3.bn.num_batches_tracked": np.zeros(())})
    )
    with pytest.raises(FileNotFoundError, match="convert_inception_weights"):
        inception.load_inception_variables(tmp_path / "absent.npz")
    (tmp_path / "w.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="is a PyTorch file; convert it first"):
        inception.load_inception_variables(tmp_path / "w.pth")


# ----------------------------------------------------------------------------- the network


@pytest.mark.slow
def test_network_shapes_head_and_batch_independence(state_dict, variables, inception_fn):
    a, b = _images(1), _images(2)
    pool_a, logits_a = (np.asarray(v) for v in inception_fn(variables, jnp.asarray(a)))
    assert pool_a.shape == (2, 2048) and logits_a.shape == (2, 1008)
    assert np.all(pool_a >= 0)  # the global average of ReLU outputs
    assert pool_a.std() > 1e-2 and not np.allclose(pool_a[0], pool_a[1])  # not degenerate
    # The head is the fc layer on pool3 (torch layout, float64): checks its transpose.
    ref = pool_a.astype(np.float64) @ state_dict["fc.weight"].T.astype(np.float64)
    np.testing.assert_allclose(logits_a, ref + state_dict["fc.bias"], rtol=1e-4, atol=1e-5)
    # Examples do not interact (inference BatchNorm uses running statistics).
    mixed = np.concatenate([a[:1], b[1:]])
    pool_m, _ = inception_fn(variables, jnp.asarray(mixed))
    np.testing.assert_allclose(np.asarray(pool_m)[0], pool_a[0], rtol=1e-5, atol=1e-6)


def _import_pytorch_fid():
    """pytorch_fid.inception, or None. Works around torchvision wheels whose C++ ops fail to load.

    A torchvision built for CUDA torch cannot load its ops library next to a CPU-only torch, and
    its import then stops at registering fake kernels for two undefined ops. Defining just those
    two op schemas lets the pure-Python model code (all pytorch-fid needs) import.
    """
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return None
    except RuntimeError:
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _import_pytorch_fid.lib = lib  # keep the definitions alive
        try:
            import torchvision  # noqa: F401
        except Exception:
            return None
    try:
        import pytorch_fid.inception as pfi
    except ImportError:
        return None
    return pfi


@pytest.mark.slow
def test_features_match_pytorch_fid_with_random_weights(state_dict, variables, inception_fn):
    pfi = _import_pytorch_fid()
    if pfi is None:
        pytest.skip("pytorch-fid (with torchvision) is not installed")
    torch_sd = {k: torch.from_numpy(v) for k, v in state_dict.items()}
    # pytorch-fid downloads its weights inside fid_inception_v3(); hand it the random ones.
    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *args, **kwargs: torch_sd
    try:
        model = pfi.InceptionV3([3], resize_input=True, normalize_input=True).eval().double()
    finally:
        pfi.load_state_dict_from_url = original
    images = _images(1)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0  # pytorch-fid's input
        ref_pool = model(x)[0][:, :, 0, 0].numpy()  # [2, 2048], float64 reference
    pool, logits = (np.asarray(v, np.float64) for v in inception_fn(variables, jnp.asarray(images)))
    # float32 through ~95 conv layers vs a float64 reference: observed ~3e-7 of the largest
    # feature; 1e-5 leaves margin and still fails on any wiring error (those give O(1)).
    scale = np.abs(ref_pool).max()
    assert np.abs(pool - ref_pool).max() <= 1e-5 * scale
    ref_logits = ref_pool @ state_dict["fc.weight"].T.astype(np.float64) + state_dict["fc.bias"]
    assert np.abs(logits - ref_logits).max() <= 1e-5 * np.abs(ref_logits).max()


@pytest.mark.slow  # writes, hashes and converts a 95 MB file
def test_conversion_script_end_to_end(state_dict, tmp_path, capsys):
    import importlib.util

    script = pathlib.Path(__file__).parents[1] / "scripts" / "convert_inception_weights.py"
    spec = importlib.util.spec_from_file_location("convert_inception_weights", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pth = tmp_path / "weights.pth"
    torch_sd = {k: torch.from_numpy(v) for k, v in state_dict.items()}
    torch_sd["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)  # as in real checkpoints
    torch.save(torch_sd, pth)
    assert module.main([str(pth), str(tmp_path / "w.npz")]) == 0
    assert "not 6726825d" in capsys.readouterr().err  # random weights: the hash check warns
    loaded = inception.load_inception_variables(tmp_path / "w.npz")
    np.testing.assert_array_equal(
        loaded["params"]["Mixed_5b"]["branch5x5_2"]["conv"]["kernel"],
        np.transpose(state_dict["Mixed_5b.branch5x5_2.conv.weight"], (2, 3, 1, 0)),
    )
    assert module.main([str(tmp_path / "absent.pth"), str(tmp_path / "x.npz")]) == 2
