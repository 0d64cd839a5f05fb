"""Bad Keras files: what the loader refuses, and that refusing costs little memory and time.

Every file here is crafted in ``tmp_path`` with h5py and zipfile: a ``.keras`` zip
(``config.json`` + ``model.weights.h5``) or a legacy ``.h5`` (``model_config``
attribute + ``model_weights/<layer>/<layer>/<variable>:0``), each holding
BatchNormalization layers named ``bn``, ``bn_1``, ... The loader must read nothing
outside the file (HDF5 external storage, external links, virtual datasets),
check sizes before allocating (zip bombs, huge declared datasets), refuse bad
weights, and raise only ``FileNotFoundError``, ``IsADirectoryError`` or a
``ValueError`` naming the file for anything malformed.
"""

from __future__ import annotations

import io
import json
import os
import struct
import time
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchnorm as bn
from batchnorm.tools import keras_io

h5py = pytest.importorskip("h5py")
pytestmark = pytest.mark.usefixtures("one_thread")

FORMATS = ("keras", "h5")
VARIABLES = ("gamma", "beta", "moving_mean", "moving_variance",  # in Keras's order
             "moving_stddev", "renorm_mean", "renorm_stddev")
GOOD = {"gamma": [1.0, 2.0], "beta": [0.0, 0.5], "moving_mean": [0.1, 0.2],
        "moving_variance": [1.0, 3.0]}
RENORM = {**GOOD, "moving_stddev": [1.0, 1.7], "renorm_mean": [0.1, 0.2],
          "renorm_stddev": [1.0, 1.7]}
FIXTURES = Path(__file__).parent / "fixtures" / "keras"
# What a refused file may raise: nothing else may escape the loader.
ALLOWED = (FileNotFoundError, IsADirectoryError, ValueError)


def bn_entry(name: str, build_shape: list | None = None, **config) -> dict:
    entry = {"class_name": "BatchNormalization",
             "config": {"name": name, "axis": -1, "momentum": 0.9, "epsilon": 1e-3,
                        "center": True, "scale": True, **config}}
    if build_shape is not None:
        entry["build_config"] = {"input_shape": build_shape}
    return entry


def model_config(entries: list[dict]) -> dict:
    return {"class_name": "Sequential", "config": {"name": "model", "layers": entries}}


def var_group(fmt: str, index: int = 0) -> str:
    """The HDF5 group holding the variables of the ``index``-th BatchNormalization."""
    if fmt == "keras":
        return "layers/batch_normalization" + (f"_{index}" if index else "") + "/vars"
    name = "bn" + (f"_{index}" if index else "")
    return f"model_weights/{name}/{name}"


def var_key(fmt: str, variable: str) -> str:
    return str(VARIABLES.index(variable)) if fmt == "keras" else f"{variable}:0"


def write_weights(file, fmt: str, layers: list[dict]) -> None:
    for index, variables in enumerate(layers):
        group = file.create_group(var_group(fmt, index))
        if fmt == "h5":
            name = group.name.split("/")[-1]
            file[f"model_weights/{name}"].attrs["weight_names"] = [
                f"{name}/{v}:0" for v in variables]
        for variable, value in variables.items():
            value = np.asarray(value)
            group.create_dataset(var_key(fmt, variable),
                                 data=value if value.dtype != np.float64 else value.astype("f4"))


def save(directory: Path, fmt: str, layers: list[dict] | None = None, *,
         config: dict | None = None, edit: Callable | None = None,
         build_shape: list | None = None) -> Path:
    """A model file of ``fmt`` with one BatchNormalization per dict of ``layers``
    (variable -> values; GOOD by default). ``config`` replaces the model config;
    ``edit(h5file)`` changes the weights file after it is written."""
    layers = [GOOD] if layers is None else layers
    if config is None:
        config = model_config([bn_entry("bn" + (f"_{i}" if i else ""), build_shape)
                               for i in range(len(layers))])
    if fmt == "keras":
        weights = io.BytesIO()
        with h5py.File(weights, "w") as file:
            write_weights(file, fmt, layers)
            if edit:
                edit(file)
        path = directory / "model.keras"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("config.json", json.dumps(config))
            archive.writestr("model.weights.h5", weights.getvalue())
        return path
    path = directory / "model.h5"
    with h5py.File(path, "w") as file:
        file.attrs["model_config"] = json.dumps(config)
        write_weights(file, fmt, layers)
        if edit:
            edit(file)
    return path


def replace(file, path: str, make: Callable) -> None:
    """Replace the link at ``path`` by ``make(parent group, name)``'s."""
    parent, _, name = path.rpartition("/")
    del file[path]
    make(file[parent or "/"], name)


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside the model holding two float32s, 42 and 43: a model must never read it."""
    path = tmp_path / "secret.bin"
    np.array([42.0, 43.0], dtype="<f4").tofile(path)
    return path


@pytest.fixture
def other_file(tmp_path: Path) -> Path:
    """Another HDF5 file holding every variable (value 42), as a link target."""
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as file:
        for fmt in FORMATS:
            group = file.create_group(fmt)
            for variable in VARIABLES:
                group.create_dataset(var_key(fmt, variable), data=np.full(2, 42.0, "f4"))
    return path


def refused(path: Path, match: str) -> ValueError:
    with pytest.raises(ValueError, match=match) as info:
        bn.load_keras_batchnorms(path)
    assert str(path) in str(info.value)
    return info.value


# ------------------------------------------------------------ data outside the file

@pytest.mark.parametrize("fmt", FORMATS)
def test_a_dataset_stored_in_another_file_is_refused(tmp_path, fmt, secret) -> None:
    key = f"{var_group(fmt)}/{var_key(fmt, 'moving_mean')}"
    path = save(tmp_path, fmt, edit=lambda f: replace(f, key, lambda g, n: g.create_dataset(
        n, shape=(2,), dtype="<f4", external=[(str(secret), 0, 8)])))
    error = refused(path, "outside this file")
    assert "secret.bin" in str(error)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("target", ["dataset", "group"])
def test_an_external_link_is_refused(tmp_path, fmt, target, other_file) -> None:
    key = var_group(fmt) + (f"/{var_key(fmt, 'moving_mean')}" if target == "dataset" else "")
    link = h5py.ExternalLink(str(other_file), f"/{fmt}" + (
        f"/{var_key(fmt, 'moving_mean')}" if target == "dataset" else ""))

    def edit(file) -> None:
        del file[key]
        file[key] = link

    refused(save(tmp_path, fmt, edit=edit), "outside this file")


def test_an_external_link_above_the_weights_is_refused(tmp_path, other_file) -> None:
    def edit(file) -> None:  # model_weights itself lives in the other file
        del file["model_weights"]
        file["model_weights"] = h5py.ExternalLink(str(other_file), "/")

    refused(save(tmp_path, "h5", edit=edit), "outside this file")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_virtual_dataset_is_refused(tmp_path, fmt, other_file) -> None:
    def virtual(group, name) -> None:
        layout = h5py.VirtualLayout(shape=(2,), dtype="f4")
        layout[:] = h5py.VirtualSource(str(other_file), f"/{fmt}/{var_key(fmt, 'gamma')}",
                                       shape=(2,))
        group.create_virtual_dataset(name, layout)

    key = f"{var_group(fmt)}/{var_key(fmt, 'moving_mean')}"
    refused(save(tmp_path, fmt, edit=lambda f: replace(f, key, virtual)), "outside this file")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_soft_link_through_an_external_link_is_refused(tmp_path, fmt, other_file) -> None:
    key = f"{var_group(fmt)}/{var_key(fmt, 'moving_mean')}"

    def edit(file) -> None:
        file["elsewhere"] = h5py.ExternalLink(str(other_file), f"/{fmt}")
        del file[key]
        file[key] = h5py.SoftLink(f"/elsewhere/{var_key(fmt, 'gamma')}")

    refused(save(tmp_path, fmt, edit=edit), "outside this file")


@pytest.mark.parametrize("fmt", FORMATS)
def test_soft_links_within_the_file_are_followed(tmp_path, fmt) -> None:
    key = f"{var_group(fmt)}/{var_key(fmt, 'moving_mean')}"

    def edit(file) -> None:
        file["spare/mean"] = np.array([7.0, 8.0], "f4")
        file["spare/alias"] = h5py.SoftLink("mean")  # relative to its own group
        del file[key]
        file[key] = h5py.SoftLink("/spare/alias")

    layer = bn.load_keras_batchnorms(save(tmp_path, fmt, edit=edit))["bn"]
    assert layer.moving_mean.tolist() == [7.0, 8.0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_soft_link_loop_is_refused(tmp_path, fmt) -> None:
    key = f"{var_group(fmt)}/{var_key(fmt, 'moving_mean')}"

    def edit(file) -> None:
        file["a"] = h5py.SoftLink("/b")
        file["b"] = h5py.SoftLink("/a")
        del file[key]
        file[key] = h5py.SoftLink("/a")

    refused(save(tmp_path, fmt, edit=edit), "soft link")


# ------------------------------------------------------ sizes checked before reading

def peak_bytes(call: Callable) -> tuple[int, BaseException | None]:
    """Peak memory traced (NumPy's allocations included) while ``call()`` runs."""
    tracemalloc.start()
    try:
        call()
        error = None
    except Exception as caught:  # noqa: BLE001 - returned to the test
        error = caught
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, error


def stream_member(archive: zipfile.ZipFile, name: str, size: int, chunk: bytes = b" ") -> None:
    """A member of ``size`` bytes of ``chunk`` repeated, deflated, written 1 MiB at a time."""
    block = chunk * (2**20 // len(chunk))
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with archive.open(info, "w") as member:
        for start in range(0, size, len(block)):
            member.write(block[:size - start])


def set_declared_size(path: Path, member: str, size: int) -> None:
    """Make the central directory claim ``size`` uncompressed bytes for ``member``."""
    data = bytearray(path.read_bytes())
    start = 0
    while (start := data.find(b"PK\x01\x02", start)) >= 0:
        name_length = struct.unpack_from("<H", data, start + 28)[0]
        if data[start + 46:start + 46 + name_length] == member.encode():
            struct.pack_into("<I", data, start + 24, size)
            path.write_bytes(bytes(data))
            return
        start += 4
    raise AssertionError(f"no {member} in {path}")


def assert_cheap(path: Path, match: str, limit: int = 16 * 2**20) -> None:
    started = time.perf_counter()
    peak, error = peak_bytes(lambda: bn.load_keras_batchnorms(path))
    assert isinstance(error, ValueError), error
    assert str(path) in str(error) and match in str(error), error
    assert peak < limit, f"{peak / 2**20:.0f} MiB traced while refusing {path.name}"
    assert time.perf_counter() - started < 10


def test_a_config_json_that_inflates_past_the_cap_is_refused_before_reading(tmp_path) -> None:
    path = tmp_path / "bomb.keras"
    with zipfile.ZipFile(path, "w") as archive:
        stream_member(archive, "config.json", keras_io.MAX_CONFIG_BYTES + 2**20)
        archive.writestr("model.weights.h5", b"")
    assert path.stat().st_size < 2**20
    assert_cheap(path, "config.json")


def test_a_zip_header_that_overstates_a_member_is_refused_before_reading(tmp_path) -> None:
    path = save(tmp_path, "keras")
    set_declared_size(path, "config.json", 2**31)
    assert_cheap(path, "config.json")


def test_a_zip_header_that_understates_a_member_is_refused(tmp_path) -> None:
    path = tmp_path / "liar.keras"
    with zipfile.ZipFile(path, "w") as archive:
        stream_member(archive, "config.json", 8 * 2**20)
        archive.writestr("model.weights.h5", b"")
    set_declared_size(path, "config.json", 100)  # the data inflates to 8 MiB
    assert_cheap(path, "config.json")


def test_a_weights_member_that_inflates_far_beyond_the_zip_is_refused(tmp_path) -> None:
    path = tmp_path / "bomb.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps(model_config([bn_entry("bn")])))
        stream_member(archive, "model.weights.h5", 64 * 2**20, b"\0")
    assert_cheap(path, "model.weights.h5")


def huge(group, name: str, size: int = 500_000_000) -> None:
    """A dataset declaring ``size`` float32s with nothing written: a few KiB on disk."""
    group.create_dataset(name, shape=(size,), dtype="f4", chunks=(2**20,),
                         compression="gzip", fillvalue=1.0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_huge_declared_weight_is_refused_before_reading(tmp_path, fmt) -> None:
    key = f"{var_group(fmt)}/{var_key(fmt, 'moving_mean')}"
    path = save(tmp_path, fmt, edit=lambda f: replace(f, key, huge))
    assert path.stat().st_size < 2**20
    assert_cheap(path, "moving_mean")


@pytest.mark.parametrize("fmt", FORMATS)
def test_huge_consistent_weights_are_refused_before_reading(tmp_path, fmt) -> None:
    # Every variable declares 2**27 float32s (512 MiB each): consistent shapes, but more than
    # the layer's input has features (.keras) or than MAX_WEIGHT_BYTES allows (.h5).
    def edit(file) -> None:
        for variable in GOOD:
            replace(file, f"{var_group(fmt)}/{var_key(fmt, variable)}",
                    lambda g, n: huge(g, n, 2**27))

    path = save(tmp_path, fmt, edit=edit, build_shape=[None, 2] if fmt == "keras" else None)
    assert_cheap(path, "features" if fmt == "keras" else "MAX_WEIGHT_BYTES")


def test_weights_of_other_layers_are_not_read(tmp_path) -> None:
    # A legacy .h5 whose Dense kernel declares 500 million float32s: only BatchNormalization
    # weights are read, so loading costs nothing.
    def edit(file) -> None:
        file["model_weights/dense"].attrs["weight_names"] = ["dense/kernel:0"]
        huge(file["model_weights/dense"].create_group("dense"), "kernel:0")

    config = model_config([{"class_name": "Dense", "config": {"name": "dense"}},
                           bn_entry("bn")])
    path = save(tmp_path, "h5", config=config, edit=lambda f: (
        f.create_group("model_weights/dense"), edit(f)))
    peak, error = peak_bytes(lambda: bn.load_keras_batchnorms(path))
    assert error is None and peak < 16 * 2**20


def test_the_total_of_batchnorm_weights_is_bounded(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(keras_io, "MAX_WEIGHT_BYTES", 3 * 4 * 2 * 4)  # three layers' worth
    path = save(tmp_path, "h5", [GOOD] * 4)
    refused(path, "MAX_WEIGHT_BYTES")
    assert len(bn.load_keras_batchnorms(save(tmp_path, "keras", [GOOD] * 3))) == 3


# ------------------------------------------------------------- bad weights in a file

BAD_WEIGHTS = {  # id -> (variable, stored value, what the message says)
    "2x2 gamma": ("gamma", np.ones((2, 2), "f4"), "shape"),
    "short mean": ("moving_mean", np.zeros(3, "f4"), "shape"),
    "scalar": ("beta", np.float32(0.0), "shape"),
    "complex": ("gamma", np.array([1 + 1j, 2], "c8"), "dtype"),
    "integer": ("moving_mean", np.array([1, 2], "i4"), "dtype"),
    "nan": ("gamma", np.array([np.nan, 1], "f4"), "finite"),
    "inf mean": ("moving_mean", np.array([np.inf, 1], "f4"), "finite"),
    "beyond float32": ("beta", np.array([1e300, 0]), "finite"),
    "negative variance": ("moving_variance", np.array([1, -1e-3], "f4"), ">= 0"),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", BAD_WEIGHTS)
def test_bad_weights_in_a_file_are_refused(tmp_path, fmt, case) -> None:
    variable, value, match = BAD_WEIGHTS[case]
    key = f"{var_group(fmt)}/{var_key(fmt, variable)}"
    path = save(tmp_path, fmt, edit=lambda f: replace(
        f, key, lambda g, n: g.create_dataset(n, data=value)))
    error = refused(path, match)
    assert "'bn'" in str(error) and variable in str(error)


@pytest.mark.parametrize("fmt", FORMATS)
def test_big_endian_weights_load(tmp_path, fmt) -> None:
    key = f"{var_group(fmt)}/{var_key(fmt, 'moving_mean')}"
    path = save(tmp_path, fmt, edit=lambda f: replace(
        f, key, lambda g, n: g.create_dataset(n, data=np.array([0.5, 2.0], ">f4"))))
    assert bn.load_keras_batchnorms(path)["bn"].moving_mean.tolist() == [0.5, 2.0]


def test_features_must_match_the_input_shape_in_build_config(tmp_path) -> None:
    error = refused(save(tmp_path, "keras", build_shape=[None, 5, 3]), "features")
    assert "input_shape" in str(error)
    assert bn.load_keras_batchnorms(save(tmp_path, "keras", build_shape=[None, 5, 2]))


def test_the_wrong_number_of_variables_is_refused(tmp_path) -> None:
    no_gamma = {k: v for k, v in GOOD.items() if k != "gamma"}
    refused(save(tmp_path, "keras", [no_gamma]), "expects 4")
    refused(save(tmp_path, "h5", [no_gamma]), "gamma")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_refused_file_changes_nothing(tmp_path, fmt, monkeypatch) -> None:
    # Loading builds new layers, so "nothing changes" means: every layer's weights are checked
    # before any layer is built, and layers loaded before stay bit-identical.
    (tmp_path / "good").mkdir()
    loaded = bn.load_keras_batchnorms(save(tmp_path / "good", fmt, [GOOD, GOOD]))
    before = {name: {k: v.clone() for k, v in layer.state_dict().items()}
              for name, layer in loaded.items()}
    built = []
    from_config = bn.BatchNorm.from_config.__func__
    monkeypatch.setattr(bn.BatchNorm, "from_config", classmethod(
        lambda cls, config: built.append(config) or from_config(cls, config)))
    bad = {**GOOD, "moving_variance": [1.0, np.nan]}
    refused(save(tmp_path, fmt, [GOOD, bad]), "finite")
    assert built == []
    for name, layer in loaded.items():
        for key, value in layer.state_dict().items():
            assert torch.equal(value, before[name][key]), (name, key)


# --------------------------------------------------------- malformed files, typed

def test_a_missing_path_is_file_not_found(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.keras"):
        bn.load_keras_batchnorms(tmp_path / "nothing.keras")


def test_a_directory_is_a_directory_error(tmp_path) -> None:
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        bn.load_keras_batchnorms(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_a_fifo_is_refused_without_opening_it(tmp_path) -> None:
    os.mkfifo(tmp_path / "pipe.keras")  # opening it would block until a writer comes
    refused(tmp_path / "pipe.keras", "regular file")


BAD_CONFIGS = {  # id -> (model config, or a str for config.json's raw text; message part)
    "not json": ("{'layers': []", "JSON"),
    "not utf-8": ("\udcff", "JSON"),
    "a list": ([], "JSON object"),
    "layers not a list": ({"config": {"layers": {"a": 1}}}, "list"),
    "entry not a dict": (model_config([3]), "class_name"),
    "no class_name": (model_config([{"config": {}}]), "class_name"),
    "config not a dict": (model_config([{"class_name": "BatchNormalization",
                                         "config": [1]}]), "config"),
    "no name": (model_config([{"class_name": "BatchNormalization", "config": {}}]), "name"),
    "center not a bool": (model_config([bn_entry("bn", center="yes")]), "center"),
    "axis a string": (model_config([bn_entry("bn", axis="x")]), "axis"),
    "axis twice": (model_config([bn_entry("bn", axis=[1, 1])]), "axis"),
    "momentum": (model_config([bn_entry("bn", momentum=5)]), "momentum"),
    "renorm_clipping a list": (model_config([bn_entry("bn", renorm=True,
                                                      renorm_clipping=[])]), "renorm_clipping"),
    "initializer config a list": (model_config([bn_entry("bn", gamma_initializer={
        "class_name": "Constant", "config": [1]})]), "gamma_initializer"),
    "unknown key": (model_config([bn_entry("bn", fancy=1)]), "fancy"),
    "duplicate names": (model_config([bn_entry("bn"), bn_entry("bn")]), "two"),
    "deeply nested": ("[" * 100_000 + "]" * 100_000, "nest"),
    "nested models": (json.loads('{"config": {"layers": [' * 200 + "]}}" * 200), "nest"),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_a_malformed_config_is_a_value_error_naming_the_file(tmp_path, fmt, case) -> None:
    config, match = BAD_CONFIGS[case]
    layers = {"duplicate names": [GOOD, GOOD], "renorm_clipping a list": [RENORM]}.get(case, [GOOD])
    path = save(tmp_path, fmt, layers, config={"config": {"layers": []}})
    raw = config if isinstance(config, str) else json.dumps(config)
    if fmt == "keras":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("config.json", raw.encode(errors="surrogateescape"))
            weights = io.BytesIO()
            with h5py.File(weights, "w") as file:
                write_weights(file, fmt, layers)
            archive.writestr("model.weights.h5", weights.getvalue())
    else:
        with h5py.File(path, "a") as file:
            file.attrs["model_config"] = np.bytes_(raw.encode(errors="surrogateescape")) \
                if case == "not utf-8" else raw
    error = refused(path, match)
    assert "Traceback" not in str(error)


@pytest.mark.parametrize(("member", "data"), [
    ("config.json", None), ("model.weights.h5", None), ("model.weights.h5", b"not hdf5")])
def test_a_keras_zip_without_its_members_is_a_value_error(tmp_path, member, data) -> None:
    path = save(tmp_path, "keras")
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    if data is None:
        del members[member]
    else:
        members[member] = data
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    refused(path, member)


def test_an_encrypted_member_is_a_value_error(tmp_path) -> None:
    path = save(tmp_path, "keras")
    data = bytearray(path.read_bytes())
    for signature, flags in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            data[start + flags] |= 1  # the "encrypted" bit
            start += 4
    path.write_bytes(bytes(data))
    refused(path, "config.json")


def test_a_weights_only_h5_is_a_value_error(tmp_path) -> None:
    path = save(tmp_path, "h5")
    with h5py.File(path, "a") as file:
        del file.attrs["model_config"]
    refused(path, "model_config")


@pytest.mark.parametrize("name", ["keras3.keras", "tf_keras.keras", "keras3.h5", "tf_keras.h5"])
def test_a_truncated_file_is_a_value_error(tmp_path, name) -> None:
    data = (FIXTURES / name).read_bytes()
    for keep in (10, len(data) // 3, len(data) // 2, len(data) - 100):
        path = tmp_path / f"{keep}_{name}"
        path.write_bytes(data[:keep])
        with pytest.raises(ValueError, match=str(path)):
            bn.load_keras_batchnorms(path)


def test_nothing_is_written(tmp_path) -> None:
    path = save(tmp_path, "keras")
    before = sorted(p.name for p in tmp_path.iterdir())
    bn.load_keras_batchnorms(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ------------------------------------------------------------------ property: what escapes

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 8) | st.floats() | st.text(max_size=4),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["axis", "center", "scale", "renorm", "name",
                                       "config", "layers", "class_name", "momentum",
                                       "epsilon", "input_shape", "x"]), children, max_size=4),
    max_leaves=12)


@pytest.mark.filterwarnings(  # a random config may ask for synchronized=True: noted, incidental
    "ignore:.*Keras synchronized=True is not applied by batchnorm.BatchNorm:UserWarning")
@pytest.mark.filterwarnings(  # or a regularizer given as a dict: noted, incidental too
    "ignore:.*is not carried over; pass a callable instead:UserWarning")
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(FORMATS), key=st.sampled_from(
    ["axis", "center", "scale", "renorm", "name", "momentum", "epsilon", "renorm_clipping",
     "gamma_initializer", "beta_regularizer", "synchronized", "dtype", "trainable"]),
    value=JSON, build=JSON, weight=st.sampled_from(
        [None, np.zeros((2, 2), "f4"), np.zeros(0, "f4"), np.array([1, -1], "f2")]))
def test_random_configs_raise_only_value_errors(tmp_path_factory, fmt, key, value, build,
                                                weight) -> None:
    entry = bn_entry("bn")
    entry["config"][key], entry["build_config"] = value, build
    layers = [GOOD if weight is None else {**GOOD, "moving_variance": weight}]
    path = save(tmp_path_factory.mktemp("random"), fmt, layers, config=model_config([entry]))
    try:
        layers = bn.load_keras_batchnorms(path)
    except ALLOWED:
        return
    assert all(isinstance(layer, bn.BatchNorm) for layer in layers.values())


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["keras3.keras", "tf_keras.keras", "keras3.h5", "tf_keras.h5"]),
       data=st.data())
def test_damaged_files_raise_only_value_errors(tmp_path_factory, name, data) -> None:
    # .keras files get random bytes changed (the zip's CRC stops a damaged weights member
    # before HDF5 parses it), .h5 files are only truncated: the HDF5 C library itself can
    # crash on a damaged .h5, which no check in Python can prevent (see keras_io's notes).
    raw = bytearray((FIXTURES / name).read_bytes())
    if name.endswith(".keras"):
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    raw = raw[:data.draw(st.integers(0, len(raw)))]
    path = tmp_path_factory.mktemp("damaged") / name
    path.write_bytes(bytes(raw))
    try:
        bn.load_keras_batchnorms(path)
    except ALLOWED:
        pass



# ------------------------------------------------------------- one bad layer, huge numbers

@pytest.mark.parametrize("fmt", FORMATS)
def test_a_bad_layer_is_named_and_errors_warn_loads_the_others(tmp_path, fmt) -> None:
    bad = {**GOOD, "moving_variance": [1.0, -1.0]}
    path = save(tmp_path, fmt, [GOOD, bad])
    error = refused(path, "bn_1")
    assert "errors='warn'" in str(error)
    with pytest.warns(UserWarning, match="'bn_1'.*left out"):
        layers = bn.load_keras_batchnorms(path, errors="warn")
    assert list(layers) == ["bn"]
    assert layers["bn"].moving_variance.tolist() == GOOD["moving_variance"]


def test_a_config_that_cannot_build_a_layer_leaves_only_that_layer_out(tmp_path) -> None:
    config = model_config([bn_entry("bn"), bn_entry("bn_1", momentum=2.0)])
    path = save(tmp_path, "keras", [GOOD, GOOD], config=config)
    with pytest.warns(UserWarning, match="'bn_1'.*momentum"):
        layers = bn.load_keras_batchnorms(path, errors="warn")
    assert list(layers) == ["bn"]


def test_errors_must_be_raise_or_warn(tmp_path) -> None:
    with pytest.raises(ValueError, match="errors='ignore'"):
        bn.load_keras_batchnorms(save(tmp_path, "keras"), errors="ignore")


HUGE = {  # JSON text in the layer config -> the key path the message names
    '"epsilon": 1e400': "epsilon=inf",
    '"momentum": NaN': "momentum=nan",
    '"gamma_initializer": {"class_name": "Constant", "config": {"value": 1e300}}':
        "gamma_initializer['config']['value']=1e+300",
    '"virtual_batch_size": 1' + "0" * 400: "virtual_batch_size=",
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("text", HUGE)
def test_huge_numbers_in_a_layer_config_are_value_errors_naming_them(tmp_path, fmt,
                                                                     text) -> None:
    # Written as JSON text: json.dumps cannot write 1e400, Python's parser reads it as inf.
    config = model_config([bn_entry("bn", epsilon="@")])
    raw = json.dumps(config).replace('"epsilon": "@"', text)
    path = save(tmp_path, fmt)
    if fmt == "keras":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("config.json", raw)
            weights = io.BytesIO()
            with h5py.File(weights, "w") as file:
                write_weights(file, fmt, [GOOD])
            archive.writestr("model.weights.h5", weights.getvalue())
    else:
        with h5py.File(path, "r+") as file:
            file.attrs["model_config"] = raw
    error = refused(path, "'bn'")
    assert HUGE[text] in str(error)


# ---------------------------------------------------- isolated=True: a separate process

def test_isolated_reading_turns_a_hang_into_a_value_error(tmp_path) -> None:
    # A child that cannot finish in time stands for the HDF5 library looping on a damaged
    # file (a one-byte corruption can do it): it is killed, and the file named.
    path = save(tmp_path, "h5")
    with pytest.raises(ValueError, match="timeout=0.01") as info:
        bn.load_keras_batchnorms(path, isolated=True, timeout=0.01)
    assert str(path) in str(info.value)


def test_isolated_reading_turns_a_crash_into_a_value_error(tmp_path) -> None:
    # 32 MiB of address space is too little for the child to start: it dies, as on a crash.
    path = save(tmp_path, "h5")
    with pytest.raises(ValueError, match="process reading it ended") as info:
        bn.load_keras_batchnorms(path, isolated=True, max_memory=32 * 2**20)
    assert str(path) in str(info.value)


def test_isolated_reading_checks_its_limits() -> None:
    with pytest.raises(ValueError, match="timeout=0"):
        bn.load_keras_batchnorms(FIXTURES / "tf_keras.h5", isolated=True, timeout=0)
    with pytest.raises(ValueError, match="max_memory=-1"):
        bn.load_keras_batchnorms(FIXTURES / "tf_keras.h5", isolated=True, max_memory=-1)


@pytest.mark.slow  # starts Python processes (seconds each)
@pytest.mark.parametrize("filename", ["tf_keras_seq.keras", "tf_keras.h5"])
def test_isolated_reading_gives_the_same_layers(filename) -> None:
    path = FIXTURES / filename
    here, there = bn.load_keras_batchnorms(path), bn.load_keras_batchnorms(path, isolated=True)
    assert list(here) == list(there)
    for name, layer in here.items():
        assert repr(layer) == repr(there[name])
        for key, value in layer.state_dict().items():
            assert torch.equal(value, there[name].state_dict()[key]), (name, key)


@pytest.mark.slow  # starts a Python process
def test_isolated_reading_refuses_what_reading_refuses(tmp_path) -> None:
    path = save(tmp_path, "h5", [{**GOOD, "moving_variance": [1.0, -1.0]}])
    with pytest.raises(ValueError, match=">= 0") as info:
        bn.load_keras_batchnorms(path, isolated=True)
    assert str(path) in str(info.value)
