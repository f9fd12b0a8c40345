"""User mistakes raise evolq's own errors with one-line messages: unknown models,
bad weights files, bad data folders, out-of-range bit widths."""
from __future__ import annotations

import csv
import zipfile

import pytest
import torch

timm = pytest.importorskip("timm")

from evolq.config import EvolQConfig, QuantConfig  # noqa: E402
from evolq.data import ImageDataset, assets_dir, load_images  # noqa: E402
from evolq.errors import ConfigError, DataError, EvolQError, UnknownModelError, WeightsError  # noqa: E402
from evolq.models import create_model, load_model, load_weights  # noqa: E402

ARCH = "vit_tiny_patch16_224"


def one_line(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    assert isinstance(excinfo.value, EvolQError)
    return msg


def save_safetensors(sd, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def small_sd():
    """State dict of a small ViT (same key names as ViT-Tiny, fewer blocks)."""
    torch.manual_seed(0)
    m = timm.create_model(ARCH, pretrained=False, depth=1)
    return m.state_dict()


# --------------------------------------------------------------------------- models
@pytest.mark.parametrize("name", ["vit_tinyy_patch16_224", "no_such_model", "", None, "torchvision:no_such_net"])
def test_unknown_model_name(name):
    with pytest.raises(UnknownModelError) as e:
        load_model(name, hub=False)
    msg = one_line(e)
    if name == "vit_tinyy_patch16_224":
        assert "did you mean" in msg and ARCH in msg
    with pytest.raises(UnknownModelError):
        create_model(name)


def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsError) as e:
        load_model(ARCH, weights=tmp_path / "nope.safetensors", hub=False)
    assert "does not exist" in one_line(e)
    with pytest.raises(WeightsError) as e:
        load_model(ARCH, weights=tmp_path, hub=False)  # a folder, not a file
    one_line(e)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_truncated_weights_file(tmp_path, small_sd, fmt):
    full = tmp_path / f"full.{fmt}"
    if fmt == "safetensors":
        save_safetensors(small_sd, full)
    else:
        torch.save(small_sd, full)
    data = full.read_bytes()
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError) as e:
        load_model(ARCH, weights=cut, hub=False)
    assert "cut" in one_line(e)
    # an intact file of the same kind is read fine (the failure above is the truncation)
    m = timm.create_model(ARCH, pretrained=False, depth=1)
    load_weights(m, full)
    torch.testing.assert_close(m.state_dict()["head.weight"], small_sd["head.weight"])


@pytest.mark.parametrize("content", [b"", b"definitely not a weights file" * 10, b"\x00" * 64])
def test_garbage_weights_file(tmp_path, content):
    for suffix in (".safetensors", ".pth"):
        f = tmp_path / f"junk{suffix}"
        f.write_bytes(content)
        with pytest.raises(WeightsError) as e:
            load_model(ARCH, weights=f, hub=False)
        one_line(e)


def test_weights_file_without_tensors(tmp_path):
    f = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], f)
    with pytest.raises(WeightsError) as e:
        load_model(ARCH, weights=f, hub=False)
    assert "state dict" in one_line(e)
    # pickled code is refused (weights_only loading), not executed
    f2 = tmp_path / "code.pth"
    torch.save({"w": torch.zeros(1), "f": zipfile.ZipFile}, f2)
    with pytest.raises(WeightsError):
        load_model(ARCH, weights=f2, hub=False)


def test_weights_for_another_architecture(tmp_path, small_sd):
    torch.manual_seed(0)
    cnn = save_safetensors(timm.create_model("resnet10t", pretrained=False).state_dict(),
                           tmp_path / "resnet.safetensors")
    with pytest.raises(WeightsError) as e:
        load_model(ARCH, weights=cnn, hub=False)
    msg = one_line(e)
    assert "missing keys" in msg and "unexpected keys" in msg
    # same family, fewer blocks: keys missing
    shallow = save_safetensors(small_sd, tmp_path / "vit_depth1.safetensors")
    with pytest.raises(WeightsError) as e:
        load_model(ARCH, weights=shallow, hub=False)
    assert "missing keys" in one_line(e)
    # same keys, other widths: shape mismatches
    wide = timm.create_model(ARCH, pretrained=False, embed_dim=96, num_heads=3).state_dict()
    wide_f = tmp_path / "vit_wide.pth"
    torch.save(wide, wide_f)
    with pytest.raises(WeightsError) as e:
        load_model(ARCH, weights=wide_f, hub=False)
    assert "shape mismatch" in one_line(e)


def test_real_weights_for_another_architecture():
    root = assets_dir(required=False)
    f = root / "models" / "tf_efficientnet_lite0.in1k.safetensors" if root else None
    if f is None or not f.is_file():
        pytest.skip("EfficientNet-Lite0 weights not in the assets")
    with pytest.raises(WeightsError) as e:
        load_model(ARCH, weights=f, hub=False)
    one_line(e)


# --------------------------------------------------------------------------- data
def to_tensor(img):
    import numpy as np

    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype="float32")).permute(2, 0, 1) / 255


def write_image(path, color=(200, 10, 10)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path)
    return path


def write_labels(folder, rows, header=("file", "label")):
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_missing_data_folder(tmp_path):
    with pytest.raises(DataError) as e:
        load_images(tmp_path / "nowhere", to_tensor)
    assert "does not exist" in one_line(e)
    f = write_image(tmp_path / "a.png")
    with pytest.raises(DataError) as e:
        load_images(f, to_tensor)  # a file, not a folder
    one_line(e)


def test_folder_with_no_images(tmp_path):
    with pytest.raises(DataError) as e:
        load_images(tmp_path, to_tensor)
    assert "no labelled images" in one_line(e)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "class_a").mkdir()  # a class folder with nothing in it
    with pytest.raises(DataError) as e:
        load_images(tmp_path, to_tensor)
    one_line(e)


def test_images_without_labels(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"img{i}.jpg")
    with pytest.raises(DataError) as e:
        load_images(tmp_path, to_tensor)
    assert "no labels" in one_line(e)


@pytest.mark.parametrize("problem", ["columns", "label", "missing_file", "corrupt", "split"])
def test_bad_labels_csv(tmp_path, problem):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    if problem == "columns":
        write_labels(tmp_path, [("a.png", 0)], header=("image", "class"))
    elif problem == "label":
        write_labels(tmp_path, [("a.png", 0), ("b.png", "cat")])
    elif problem == "missing_file":
        write_labels(tmp_path, [("a.png", 0), ("gone.png", 2)])
    elif problem == "corrupt":
        (tmp_path / "bad.png").write_bytes(b"not a png")
        write_labels(tmp_path, [("a.png", 0), ("bad.png", 2)])
    elif problem == "split":  # only even labels: the evaluation split is empty
        write_labels(tmp_path, [("a.png", 0), ("b.png", 2)])
        x, y = load_images(tmp_path, to_tensor, split="calib")
        assert x.shape == (2, 3, 8, 8) and y.tolist() == [0, 2]
        with pytest.raises(DataError) as e:
            load_images(tmp_path, to_tensor, split="eval")
        one_line(e)
        return
    with pytest.raises(DataError) as e:
        load_images(tmp_path, to_tensor)
    one_line(e)


def test_good_folder_loads_and_bad_arguments(tmp_path):
    write_image(tmp_path / "cls_b" / "x.png")
    write_image(tmp_path / "cls_a" / "y.png", (0, 0, 255))
    x, y = load_images(tmp_path, to_tensor)
    assert x.shape == (2, 3, 8, 8) and sorted(y.tolist()) == [0, 1]
    with pytest.raises(DataError):
        ImageDataset(tmp_path, to_tensor, split="train")
    with pytest.raises(DataError):
        ImageDataset(tmp_path, to_tensor, limit=0)


# --------------------------------------------------------------------------- bits / config
@pytest.mark.parametrize("kw", [dict(w_bits=1), dict(w_bits=9), dict(a_bits=3), dict(a_bits=9),
                                dict(w_bits=0), dict(w_bits=-4), dict(w_bits=8.0), dict(w_bits=True),
                                dict(w_bits="8"), dict(attn_bits=1), dict(act_observer="median"),
                                dict(attn_probs="log10"), dict(ptf_zero_point="row"), dict(ptf_max_alpha=9),
                                dict(ptf_max_alpha=-1), dict(linear_input="token"),
                                dict(linear_input_strength=1.5), dict(linear_input_strength="half"),
                                dict(edge_bits=1), dict(edge_bits=9), dict(edge_bits="8")])
def test_bad_quant_config(kw):
    with pytest.raises(ConfigError) as e:
        QuantConfig(**kw)
    one_line(e)
    with pytest.raises(ConfigError):
        EvolQConfig.make(**kw)


@pytest.mark.parametrize("w_bits,a_bits", [(2, 4), (3, 8), (8, 8), (4, 6)])
def test_good_bits_accepted(w_bits, a_bits):
    cfg = QuantConfig(w_bits=w_bits, a_bits=a_bits)
    assert (cfg.w_bits, cfg.a_bits) == (w_bits, a_bits)


def test_presets():
    assert QuantConfig.preset("fq-vit") == QuantConfig()
    oa = QuantConfig.preset("outlier-aware", w_bits=4)
    assert (oa.w_bits, oa.linear_input, oa.ptf_zero_point) == (4, "channel", "channel")
    assert EvolQConfig.make(preset="outlier-aware", w_bits=4, passes=1).quant == oa
    # the migration strength follows the weight bits unless given
    strengths = [QuantConfig.preset("outlier-aware", w_bits=b).linear_input_strength for b in (8, 4, 3)]
    assert strengths == [0.75, 0.25, 0.25]
    # with a gptq/brecq start the rounding error is compensated: more migrates into the weights
    for start in ("gptq", "brecq"):
        got = [QuantConfig.preset("outlier-aware", w_bits=b, start=start).linear_input_strength for b in (8, 4, 3)]
        assert got == [0.75] + [QuantConfig.outlier_strength(b, start) for b in (4, 3)] and got[1] > 0.25
    assert QuantConfig.preset("outlier-aware", w_bits=4, linear_input_strength=1.0).linear_input_strength == 1.0
    with pytest.raises(ConfigError) as e:
        QuantConfig.preset("fast")
    assert "outlier-aware" in one_line(e)
    with pytest.raises(ConfigError):
        EvolQConfig.make(preset="fast")


def test_unknown_config_option():
    with pytest.raises(ConfigError) as e:
        EvolQConfig.make(w_bit=4)
    assert "w_bit" in one_line(e)


def test_prepare_model_rejects_bad_config_and_data():
    from evolq import prepare_model

    def fresh():
        torch.manual_seed(0)
        return timm.create_model(ARCH, pretrained=False, depth=1, img_size=32, patch_size=8, num_classes=10)

    x = torch.randn(4, 3, 32, 32)
    cfg = QuantConfig()
    cfg.w_bits = 9  # changed after construction: caught when used
    with pytest.raises(ConfigError):
        prepare_model(fresh(), x, cfg)
    for bad in (torch.empty(0, 3, 32, 32), torch.full((2, 3, 32, 32), float("nan")),
                torch.zeros(2, 3, 32, 32, dtype=torch.long)):
        with pytest.raises(DataError) as e:
            prepare_model(fresh(), bad, QuantConfig())
        one_line(e)
    qm = prepare_model(fresh(), x, QuantConfig(w_bits=4))
    assert all(bool(q.calibrated) for q in qm.quantizers().values())
