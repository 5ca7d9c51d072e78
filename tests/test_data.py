"""Dataset files: the real originals, synthetic ones, bad ones, downloads, augmentation."""
import gzip
import hashlib
import io
import pickle
import shutil
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import cifar_batch_bytes, idx_bytes, serve_directory, write_idx_gz
from vision_lstm import VilError
from vision_lstm.data import (CIFAR10, MNIST, cifar_content_sha256, ensure_files, get_spec, load_split, mix_batch,
                              normalize, parse_cifar_batch, parse_idx, random_affine, random_erase, random_hflip,
                              random_translate, read_resource, safe_unpickle, shift_images, tta_views)

# --- the real files in ../shared/data --------------------------------------------------------------------------


@pytest.mark.parametrize("name,split,count,shape", [
    ("mnist", "train", 60000, (1, 28, 28)), ("mnist", "test", 10000, (1, 28, 28)),
    ("fashion-mnist", "train", 60000, (1, 28, 28)), ("fashion-mnist", "test", 10000, (1, 28, 28)),
    ("cifar", "train", 50000, (3, 32, 32)), ("cifar10", "test", 10000, (3, 32, 32)),
])
def test_real_files_parse(shared_data, name, split, count, shape):
    data = load_split(name, split, shared_data, download=False)
    assert data.images.shape == (count, *shape) and data.images.dtype == torch.uint8
    assert data.labels.shape == (count,) and data.labels.dtype == torch.int64
    assert data.labels.min() == 0 and data.labels.max() == 9


def test_real_class_counts_and_statistics(shared_data):
    mnist = load_split("mnist", "train", shared_data, download=False)
    assert mnist.labels.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert abs(mnist.images.float().mean().item() / 255 - 0.1307) < 1e-4
    test = load_split("mnist", "test", shared_data, download=False)
    assert test.labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    cifar = load_split("cifar", "train", shared_data, download=False)
    assert cifar.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert cifar.images[0].permute(1, 2, 0).reshape(-1)[:3].tolist() == [59, 62, 63]  # R, G, B of pixel 0
    assert load_split("cifar", "test", shared_data, download=False).labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6,
                                                                                               3, 1]


def test_unknown_dataset_lists_choices():
    with pytest.raises(VilError, match="unknown dataset 'imagenet'; choose from: cifar10, fashion-mnist, mnist"):
        get_spec("imagenet")


def test_missing_files_offline_names_them(tmp_path):
    with pytest.raises(VilError, match=r"mnist: missing train-images-idx3-ubyte.gz.*in .*mnist"):
        load_split("mnist", "train", tmp_path, download=False)


# --- IDX -------------------------------------------------------------------------------------------------------


def test_idx_roundtrip():
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(idx_bytes(array)), array)


@pytest.mark.parametrize("data,message", [
    (b"\x00\x00", "too short"),
    (b"\x00\x00\x0d\x01" + b"\x00\x00\x00\x01" + b"\x00" * 4, "not an unsigned-byte IDX"),  # float IDX
    (b"\x00\x00\x08\x09", "claims 9 dimensions"),
    (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
    (b"\x00\x00\x08\x03" + b"\xff\xff\xff\xff" * 3, r"claims shape \(4294967295, 4294967295, 4294967295\)"),
    (idx_bytes(np.zeros((5, 2, 2)))[:-3], "truncated or corrupt"),
])
def test_bad_idx_is_refused(data, message):
    with pytest.raises(VilError, match=message):
        parse_idx(data, "file.idx")


def test_checksum_mismatch_names_file(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    write_idx_gz(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(10000, dtype=np.uint8))
    with pytest.raises(VilError, match=r"t10k-labels-idx1-ubyte.gz: checksum mismatch"):
        read_resource(folder / "t10k-labels-idx1-ubyte.gz", MNIST.test_files[1])


def test_recompressed_identical_content_passes(tmp_path, shared_data):
    """Verification is on the content: a different gzip wrapper around the same bytes is accepted."""
    raw = gzip.decompress((shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(raw, compresslevel=1, mtime=12345))
    assert read_resource(path, MNIST.test_files[1]).shape == (10000,)
    changed = bytearray(raw)
    changed[100] ^= 1
    path.write_bytes(gzip.compress(bytes(changed)))
    with pytest.raises(VilError, match="checksum mismatch"):
        read_resource(path, MNIST.test_files[1])


def test_corrupt_gzip_is_refused(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00garbage-garbage")
    with pytest.raises(VilError, match=r"x.gz: not a valid gzip file"):
        read_resource(path, MNIST.test_files[1])


# --- CIFAR pickles ---------------------------------------------------------------------------------------------


def test_cifar_batch_parses_bytes_and_str_keys():
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    for protocol in (2, 4):
        got_images, got_labels = parse_cifar_batch(cifar_batch_bytes(images, [1, 2, 3, 4], protocol))
        assert np.array_equal(got_images, images) and got_labels.tolist() == [1, 2, 3, 4]


class _Exploit:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/vil-pwned",))


@pytest.mark.parametrize("payload", [
    pickle.dumps(_Exploit(), protocol=2),
    pickle.dumps({"data": _Exploit()}, protocol=2),
    b"cbuiltins\neval\n(S'1+1'\ntR.",
    pickle.dumps(exec, protocol=4),  # STACK_GLOBAL builtins.exec
])
def test_restricted_unpickler_refuses_code(payload, tmp_path):
    marker = Path("/tmp/vil-pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(VilError, match="refused to load global"):
        safe_unpickle(payload, "evil_batch")
    assert not marker.exists()


try:  # numpy >= 2 moved it
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy < 2
    from numpy.core.multiarray import _reconstruct as _np_reconstruct


class _PickledState:
    """Pickles as obj(*args) with the given state, as numpy's own arrays and dtypes do: any state can be written."""

    def __init__(self, obj, args, state):
        self.reduced = (obj, args, state)

    def __reduce__(self):
        return self.reduced


def _array_state(shape=(4,), dtype=np.dtype("u1"), fortran=False, raw=b"abcd", version=1):
    return _PickledState(_np_reconstruct, (np.ndarray, (0,), b"b"), (version, shape, dtype, fortran, raw))


@pytest.mark.parametrize("payload,message", [
    (_array_state(raw=b"abc"), "needs 4 bytes, the file holds 3"),
    (_array_state(shape=(-1,)), "malformed array state"),
    (_array_state(shape=(2 ** 50,)), "malformed array state"),
    (_array_state(version=2), "malformed array state"),
    (_array_state(raw=[1, 2, 3, 4]), "data is not bytes"),
    (_array_state(dtype="u1"), "dtype or order"),
    (_PickledState(np.dtype, ("u1", False, True), (3, "<", None, None, None, -1, -1, 0, "extra")), "malformed state"),
    (np.array([1, None], dtype=object), "only plain numeric dtypes"),
    (_PickledState(np.ndarray, ((4,), "u1", b"abcd"), None), "'_NDARRAY' object|object is not callable"),
])
def test_numpy_states_are_checked_before_numpy_sees_them(payload, message):
    # The reader builds arrays and dtypes itself from checked states: numpy's own dtype.__setstate__ crashed the
    # interpreter on a malformed state (test_malformed_dtype_state_is_an_error_not_a_crash, in a subprocess). Wrong
    # sizes, shapes, versions, types; a dtype state with an entry too many; object arrays; ndarray called directly.
    with pytest.raises(VilError, match=message):
        safe_unpickle(pickle.dumps(payload, protocol=2), "b")


@pytest.mark.parametrize("array", [np.arange(6, dtype=">i4").reshape(2, 3), np.asfortranarray(
    np.arange(6, dtype=np.float32).reshape(2, 3)), np.arange(5, dtype=np.int64), np.full((2, 2), 7, np.uint8)])
def test_numpy_arrays_unpickle_as_numpy_would(array):
    for protocol in (2, 4):
        got = safe_unpickle(pickle.dumps({"a": [array]}, protocol=protocol), "b")["a"][0]
        assert type(got) is np.ndarray and got.dtype == array.dtype and np.array_equal(got, array)


@pytest.mark.slow
def test_malformed_dtype_state_is_an_error_not_a_crash():
    # One byte of a valid batch changed (found by test_reliability's fuzz test): the dtype's state loses an entry,
    # and numpy's dtype.__setstate__ on it was a segmentation fault (numpy 2.4). In a subprocess, as a crash would
    # take pytest down with it.
    valid = cifar_batch_bytes(np.zeros((2, 3, 32, 32), np.uint8), [1, 2])
    assert valid.count(b"NNNJ") == 1  # the dtype's state: ..., None, None, None, -1, ...
    code = ("import sys\nfrom vision_lstm.data import parse_cifar_batch\nfrom vision_lstm.errors import VilError\n"
            "try:\n    parse_cifar_batch(sys.stdin.buffer.read(), 'mutated')\nexcept VilError as e:\n    print(e)\n")
    run = subprocess.run([sys.executable, "-c", code], input=valid.replace(b"NNNJ", b"NNbJ"), capture_output=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    assert b"mutated: corrupt pickle" in run.stdout and b"malformed state for dtype" in run.stdout


def test_cifar_wrong_structure_is_refused():
    with pytest.raises(VilError, match="'data' must be a uint8 array"):
        parse_cifar_batch(pickle.dumps({"data": [1, 2, 3], "labels": [1]}), "b")
    with pytest.raises(VilError, match="expected a dict"):
        parse_cifar_batch(pickle.dumps([1, 2]), "b")
    with pytest.raises(VilError, match="corrupt pickle"):
        parse_cifar_batch(b"\x80\x02}q\x00(U", "b")


# --- downloads through a loopback HTTP server ------------------------------------------------------------------


def test_download_mnist_from_mirror(tmp_path, shared_data, monkeypatch):
    served = tmp_path / "served"
    shutil.copytree(shared_data / "mnist", served)
    with serve_directory(served) as url:
        monkeypatch.setenv("VIL_DATA_MIRROR", url)
        data = load_split("mnist", "test", tmp_path / "data", download=True)
    assert len(data) == 10000
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == sorted(
        p.name for p in served.iterdir())


def test_download_with_bad_checksum_leaves_nothing(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    for res in MNIST.files:
        write_idx_gz(served / res.filename, np.zeros(3, dtype=np.uint8))
    with serve_directory(served) as url:
        monkeypatch.setenv("VIL_DATA_MIRROR", url)
        with pytest.raises(VilError, match="could not download train-images-idx3-ubyte.gz.*checksum mismatch"):
            ensure_files(MNIST, tmp_path / "data")
    assert list((tmp_path / "data" / "mnist").iterdir()) == []  # no partial or unverified file stays


def test_download_unreachable_mirror(tmp_path, monkeypatch):
    monkeypatch.setenv("VIL_DATA_MIRROR", "http://127.0.0.1:9/")
    with pytest.raises(VilError, match="could not download"):
        ensure_files(MNIST, tmp_path / "data")


def _tiny_cifar_spec(tmp_path):
    """A CIFAR-like spec over two synthetic batches, shipped as a tar.gz (the real archive is 160 MB)."""
    rng = np.random.default_rng(0)
    batches = {}
    for name in ("data_batch_1", "test_batch"):
        images = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, 6)
        batches[name] = (cifar_batch_bytes(images, labels), cifar_content_sha256(images, labels))
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for name, (data, _) in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    spec = replace(CIFAR10, train_files=(replace(CIFAR10.train_files[0], content_md5=batches["data_batch_1"][1]),),
                   test_files=(replace(CIFAR10.test_files[0], content_md5=batches["test_batch"][1]),),
                   archive_md5=hashlib.md5(archive.read_bytes()).hexdigest())
    return spec, archive


def test_download_archive_verified_and_extracted(tmp_path, monkeypatch):
    spec, archive = _tiny_cifar_spec(tmp_path)
    with serve_directory(archive.parent) as url:
        monkeypatch.setenv("VIL_DATA_MIRROR", url)
        folder = ensure_files(spec, tmp_path / "data")
    assert sorted(p.name for p in folder.iterdir()) == ["data_batch_1", "test_batch"]
    images, labels = read_resource(folder / "test_batch", spec.test_files[0])
    assert images.shape == (6, 3, 32, 32)


def test_download_archive_checksum_checked_before_extraction(tmp_path, monkeypatch):
    spec, archive = _tiny_cifar_spec(tmp_path)
    spec = replace(spec, archive_md5="0" * 32)
    with serve_directory(archive.parent) as url:
        monkeypatch.setenv("VIL_DATA_MIRROR", url)
        with pytest.raises(VilError, match="checksum mismatch"):
            ensure_files(spec, tmp_path / "data")
    assert list((tmp_path / "data" / "cifar-10-batches-py").iterdir()) == []


def test_archive_path_traversal_refused(tmp_path, monkeypatch):
    spec, archive = _tiny_cifar_spec(tmp_path)
    with tarfile.open(archive, "w:gz") as tar:  # a symlink member under an expected name, and a ../ member
        link = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        link.type, link.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
        tar.addfile(link)
        evil = tarfile.TarInfo("../../evil")
        evil.size = 4
        tar.addfile(evil, io.BytesIO(b"evil"))
    spec = replace(spec, archive_md5=hashlib.md5(archive.read_bytes()).hexdigest())
    with serve_directory(archive.parent) as url:
        monkeypatch.setenv("VIL_DATA_MIRROR", url)
        with pytest.raises(VilError, match="not a regular file; refusing to extract"):
            ensure_files(spec, tmp_path / "data")
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()


# --- batched augmentation --------------------------------------------------------------------------------------


def test_translate_and_flip_are_batched_and_deterministic():
    images = torch.arange(2 * 1 * 5 * 5, dtype=torch.uint8).reshape(2, 1, 5, 5)
    a = random_translate(images, 2, torch.Generator().manual_seed(3))
    b = random_translate(images, 2, torch.Generator().manual_seed(3))
    assert a.shape == images.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    assert torch.equal(random_translate(images, 0, torch.Generator()), images)
    flipped = random_hflip(images, torch.Generator().manual_seed(0), p=1.0)
    assert torch.equal(flipped, images.flip(-1))
    # Each output is a shifted window of the zero-padded input.
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for n in range(2):
        windows = [padded[n, :, y:y + 5, x:x + 5] for y in range(5) for x in range(5)]
        assert any(torch.equal(a[n], w) for w in windows)


def test_random_erase_blanks_one_rectangle_per_chosen_image():
    images = torch.full((64, 3, 12, 10), 200, dtype=torch.uint8)
    fill = (10, 20, 30)
    out = random_erase(images, torch.Generator().manual_seed(0), p=0.5, fill=fill)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(out, random_erase(images, torch.Generator().manual_seed(0), p=0.5, fill=fill))
    erased = out != images  # (N, C, H, W)
    assert torch.equal(erased[:, 0], erased[:, 2])  # the same box in every channel, each filled with its value
    for c, value in enumerate(fill):
        assert (out[:, c][erased[:, c]] == value).all()
    n_erased = 0
    for n in range(64):
        box = erased[n, 0]
        if not box.any():
            continue
        n_erased += 1
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        assert box.sum() == len(rows) * len(cols)  # one axis-aligned rectangle
        assert box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
        assert 1 <= box.sum() <= 0.5 * 12 * 10  # at most a third of the area, plus rounding of the sides
    assert 16 <= n_erased <= 48  # p = 0.5 of 64 images
    assert (random_erase(images, torch.Generator(), p=1.0, fill=fill) != images).any((1, 2, 3)).all()
    assert random_erase(images, torch.Generator(), p=0.0, fill=fill) is images
    with pytest.raises(ValueError, match="erase probability"):
        random_erase(images, torch.Generator(), p=1.5, fill=fill)


def test_augment_batch_adds_erasing_without_changing_the_other_draws():
    from vision_lstm.engine import augment_batch
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    plain = augment_batch(images, {"translate": 2, "hflip": True}, torch.Generator().manual_seed(5), mean=[0.5])
    erased = augment_batch(images, {"translate": 2, "hflip": True, "erase": 1.0}, torch.Generator().manual_seed(5),
                           mean=[0.5])
    changed = erased != plain
    assert changed.any((1, 2, 3)).all() and (erased[changed] == 128).all()  # only the boxes differ, filled with mean


def test_augment_batch_rotates_first_when_asked():
    from vision_lstm.engine import augment_batch
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    settings = {"translate": 1, "rotate": 20, "zoom": 0.1}
    gen = torch.Generator().manual_seed(3)
    expected = random_translate(random_affine(images, gen, 20, 0.1), 1, gen)  # one generator, affine draws first
    assert torch.equal(augment_batch(images, settings, torch.Generator().manual_seed(3), mean=[0.5]), expected)
    assert not torch.equal(expected, augment_batch(images, {"translate": 1}, torch.Generator().manual_seed(3),
                                                   mean=[0.5]))


def test_mixup_is_a_convex_combination_with_the_reversed_batch():
    images, labels = torch.randn(6, 3, 8, 8), torch.arange(6)
    mixed, partners, lam = mix_batch(images, labels, torch.Generator().manual_seed(1), mixup=0.8)
    assert 0.0 < lam < 1.0 and torch.equal(partners, labels.flip(0))
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0), atol=1e-6)
    again = mix_batch(images, labels, torch.Generator().manual_seed(1), mixup=0.8)
    assert torch.equal(again[0], mixed) and again[2] == lam  # deterministic given the generator


def test_cutmix_pastes_one_box_and_weights_by_its_area():
    images = torch.zeros(4, 2, 16, 16)
    images[:2] = 1.0  # the partners of samples 2 and 3 (reversed batch) are 1s, of samples 0 and 1 are 0s
    labels = torch.tensor([0, 1, 2, 3])
    seen_box = False
    for seed in range(20):
        mixed, partners, lam = mix_batch(images, labels, torch.Generator().manual_seed(seed), cutmix=1.0)
        assert torch.equal(partners, labels.flip(0)) and 0.0 <= lam <= 1.0
        pasted = mixed[3, 0] == 1.0  # where sample 3 shows its partner
        assert torch.equal(mixed[3, 1] == 1.0, pasted)
        assert torch.equal(mixed[0, 0] == 0.0, pasted)  # the same box for every sample: sample 0 shows 0s there
        assert lam == pytest.approx(1.0 - pasted.float().mean().item())
        rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
        if len(rows):  # one axis-aligned rectangle
            seen_box = True
            assert pasted.sum() == len(rows) * len(cols) and pasted[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
    assert seen_box


def test_mixing_switches_between_mixup_and_cutmix_and_can_be_off():
    images, labels = torch.rand(4, 1, 8, 8) + 1.0, torch.arange(4)
    out, partners, lam = mix_batch(images, labels, torch.Generator(), 0.0, 0.0)
    assert out is images and partners is labels and lam == 1.0
    kinds = set()
    for seed in range(20):
        mixed, _, lam = mix_batch(images, labels, torch.Generator().manual_seed(seed), mixup=0.8, cutmix=1.0)
        exact = (mixed == images) | (mixed == images.flip(0))
        kinds.add("cutmix" if exact.all() else "mixup")
    assert kinds == {"mixup", "cutmix"}
    with pytest.raises(ValueError, match="alphas must be >= 0"):
        mix_batch(images, labels, torch.Generator(), mixup=-1.0)


def test_normalize_uses_training_statistics():
    images = torch.full((1, 1, 2, 2), 255, dtype=torch.uint8)
    expected = (1.0 - 0.1307) / 0.3081
    assert torch.allclose(normalize(images, MNIST.mean, MNIST.std), torch.full((1, 1, 2, 2), expected))


def test_random_affine_rotates_and_zooms_about_the_centre():
    # A bright dot right of the centre: rotated by up to 30 degrees it stays at the same distance from the centre
    # within its angle range; zoom moves it radially within the scale range. Disabled: the input itself.
    images = torch.zeros(200, 1, 29, 29, dtype=torch.uint8)
    images[:, :, 14, 22] = 255  # 8 pixels right of the centre pixel (14, 14)
    gen = torch.Generator().manual_seed(0)
    rotated = random_affine(images, gen, degrees=30)
    assert rotated.dtype == torch.uint8 and rotated.shape == images.shape
    ys, xs = (torch.arange(29, dtype=torch.float64) - 14).view(29, 1), (torch.arange(29, dtype=torch.float64) - 14)
    w = rotated[:, 0].double()
    mass = w.sum((1, 2))
    cy, cx = (w * ys).sum((1, 2)) / mass, (w * xs).sum((1, 2)) / mass  # intensity centroid of the dot
    radius, angle = torch.hypot(cy, cx), torch.rad2deg(torch.atan2(cy, cx))
    assert torch.allclose(radius, torch.full_like(radius, 8.0), atol=0.6)
    assert angle.abs().max() <= 31 and angle.abs().max() > 20 and angle.min() < 0 < angle.max()
    zoomed = random_affine(images, torch.Generator().manual_seed(0), zoom=0.25)[:, 0].double()
    mass = zoomed.sum((1, 2))
    cy, cx = (zoomed * ys).sum((1, 2)) / mass, (zoomed * xs).sum((1, 2)) / mass
    assert cy.abs().max() < 0.3 and 8 * 0.75 - 0.6 <= cx.min() and cx.max() <= 8 * 1.25 + 0.6 and cx.std() > 0.5
    assert torch.equal(rotated, random_affine(images, torch.Generator().manual_seed(0), degrees=30))
    assert random_affine(images, gen) is images
    with pytest.raises(ValueError, match="zoom"):
        random_affine(images, gen, zoom=1.0)


def test_shift_images_moves_content_and_fills_black():
    images = torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4)
    down_right = shift_images(images, 1, 1)
    assert torch.equal(down_right[0, 0, 1:, 1:], images[0, 0, :3, :3])
    assert down_right[0, 0, 0].sum() == 0 and down_right[0, 0, :, 0].sum() == 0
    up_left = shift_images(images, -1, -2)
    assert torch.equal(up_left[0, 0, :3, :2], images[0, 0, 1:, 2:])
    assert up_left[0, 0, 3].sum() == 0 and up_left[0, 0, :, 2:].sum() == 0
    assert torch.equal(shift_images(images, 0, 0), images)
    with pytest.raises(ValueError, match="not smaller than the image"):
        shift_images(images, 4, 0)


def test_tta_views():
    images = torch.randint(0, 256, (3, 1, 6, 6), dtype=torch.uint8)
    assert len(tta_views(images, None)) == 1
    flip = tta_views(images, "flip")
    assert torch.equal(flip[0], images) and torch.equal(flip[1], images.flip(-1))
    shifts = tta_views(images, "shift")
    assert len(shifts) == 9 and torch.equal(shifts[0], images)
    assert len({tuple(v.flatten().tolist()) for v in shifts}) == 9  # all nine distinct
    both = tta_views(images, "flip-shift")
    assert len(both) == 18 and torch.equal(both[0], images) and torch.equal(both[9], images.flip(-1))
    assert len({tuple(v.flatten().tolist()) for v in both}) == 18
    # The mirror image's shifts are the mirror images of the shifts (a shift by (dy, dx) mirrored is one by (dy, -dx)).
    assert {tuple(v.flatten().tolist()) for v in both[9:]} == {tuple(v.flip(-1).flatten().tolist()) for v in shifts}
    with pytest.raises(ValueError, match="expected flip, shift or flip-shift"):
        tta_views(images, "rotate")


def test_evaluate_takes_tta_true_as_flip():
    from vision_lstm import create_model
    from vision_lstm.data import ImageDataset
    from vision_lstm.engine import evaluate
    torch.manual_seed(0)
    data = ImageDataset(torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (12,)),
                        get_spec("mnist"))
    model = create_model("vil_tiny", dim=16, depth=1, img_size=28, in_chans=1, patch_size=7, num_classes=10)
    model.head.weight.data.normal_()  # the official init makes all logits nearly equal
    cpu = torch.device("cpu")
    assert "accuracy_tta" not in evaluate(model, data, 8, cpu, tta=False)
    assert evaluate(model, data, 8, cpu, tta=True)["accuracy_tta"] == evaluate(model, data, 8, cpu, tta="flip")[
        "accuracy_tta"]
