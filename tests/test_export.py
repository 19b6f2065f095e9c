"""qjax.export: .npz files that reload bit for bit and that numpy alone
reads."""

import inspect
import json
import os
import subprocess
import sys
import textwrap
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import Grid
from qjax import codes
from qjax import export
from qjax import models
from qjax import train


def bits(x):
  """The exact bit pattern of a float array, for bit-for-bit comparisons."""
  x = np.asarray(jax.device_get(x))
  return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def assert_same_tree(loaded, original):
  la = jax.tree.leaves(loaded, is_leaf=codes.is_codes)
  lb = jax.tree.leaves(original, is_leaf=codes.is_codes)
  assert (jax.tree.structure(loaded, is_leaf=codes.is_codes)
          == jax.tree.structure(original, is_leaf=codes.is_codes))
  for a, b in zip(la, lb):
    if codes.is_codes(b):
      assert codes.is_codes(a)
      assert a.data.dtype == b.data.dtype
      np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
      # Grid.__eq__ cannot compare scales stacked over configs: compare the
      # static grid and the scale arrays.
      assert a.grid.unscaled() == b.grid.unscaled()
      assert (a.grid.scale is None) == (b.grid.scale is None)
      if b.grid.scale is not None:
        np.testing.assert_array_equal(bits(a.grid.scale), bits(b.grid.scale))
      assert a.shape == b.shape and a.dtype == b.dtype
      np.testing.assert_array_equal(bits(codes.decode(a)),
                                    bits(codes.decode(b)))
    else:
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(bits(a), bits(b))


def assert_numpy_decodes(decoded, original):
  flat = jax.tree_util.tree_flatten_with_path(original,
                                              is_leaf=codes.is_codes)[0]
  assert list(decoded) == ["/".join(qjax.quantizers.path_names(p))
                           for p, _ in flat]
  for (_, leaf), value in zip(flat, decoded.values()):
    want = codes.decode(leaf) if codes.is_codes(leaf) else leaf
    want = np.asarray(jnp.asarray(want, jnp.float32)
                      if want.dtype.name == "bfloat16" else want)
    if codes.is_codes(leaf):
      want = want.astype(np.float32)
    assert value.dtype == want.dtype
    np.testing.assert_array_equal(bits(value), bits(want))


GRIDS = {
    "binary": Grid.binary(0.25),
    "ternary": Grid.ternary(0.5),
    "4bit": Grid.kbit(4, 0.75),
    "uint16": Grid.uniform(2**-9, lo=-1, hi=1),  # 1025 levels
}


@pytest.mark.parametrize("name", list(GRIDS))
def test_round_trip_bit_for_bit(name, tmp_path, rng):
  grid = GRIDS[name]
  x = rng.normal(size=(7, 13)).astype(np.float32)  # 91: a padded last byte
  params = {"Dense_0": {"kernel": codes.encode_nearest(x, grid),
                        "bias": jnp.asarray(x[0])},
            "conv": {"kernel": codes.encode_nearest(
                x.reshape(7, 13, 1, 1), grid,
                dtype=jnp.float16 if name == "uint16" else jnp.bfloat16)},
            "half": jnp.asarray(x[1], jnp.float16),
            "bf16": jnp.asarray(x[2], jnp.bfloat16)}
  path = tmp_path / "p.npz"
  meta = export.export(path, params)
  expected_dtype = {"binary": "uint8", "ternary": "uint8", "4bit": "uint8",
                    "uint16": "uint16"}[name]
  entry = meta["leaves"][1]
  assert entry["name"] == "Dense_0/kernel" and entry["kind"] == "codes"
  assert entry["code_dtype"] == expected_dtype
  assert entry["bits"] == (1 if name == "binary" else
                           8 * np.dtype(expected_dtype).itemsize)
  assert_same_tree(export.load(path), params)
  assert_same_tree(export.load(path, target=params), params)
  assert_numpy_decodes(export.load_numpy(path), params)


def test_scaled_grid_stacked_over_configs(tmp_path, rng):
  x = rng.normal(size=(3, 5, 4)).astype(np.float32)
  scales = jnp.array([0.5, 1.0, 2.0], jnp.float32)
  stacked = jax.vmap(lambda s, w: codes.encode_nearest(
      w, Grid.binary(0.3).scaled(s)))(scales, x)
  params = {"kernel": stacked, "ternary": jax.vmap(lambda s, w: (
      codes.encode_nearest(w, Grid.ternary(0.3).scaled(s))))(scales, x)}
  assert stacked.batch_shape == (3,)
  path = tmp_path / "s.npz"
  export.export(path, params)
  assert_same_tree(export.load(path), params)
  assert_numpy_decodes(export.load_numpy(path), params)


def _trained_state(method, optimizer, steps=2):
  model = models.get("mlp", 10, features=(512, 512))
  config = train.TrainConfig(method=method, optimizer=optimizer)
  hp = {"lr": jnp.float32(1e-2)}
  key = jax.random.PRNGKey(3)
  state = train.init_state(model, config, key, jnp.zeros((2, 28, 28, 1)), hp)
  step = jax.jit(lambda s, b: train.train_step(model, config, s, b, hp)[0])
  for i in range(steps):
    kx, ky = jax.random.split(jax.random.fold_in(key, i))
    batch = (jax.random.uniform(kx, (32, 28, 28, 1)),
             jax.random.randint(ky, (32,), 0, 10))
    state = step(state, batch)
  return model, config, state


def test_trained_mlp_state_round_trips(tmp_path):
  _, _, state = _trained_state("sr", "adam")
  tree = {"params": state.params, "batch_stats": state.batch_stats}
  path = tmp_path / "mlp.npz"
  export.export(path, tree, method="sr-adam")
  assert_same_tree(export.load(path), tree)
  assert_numpy_decodes(export.load_numpy(path), tree)
  meta = export.read_meta(path)
  assert meta["method"] == "sr-adam" and meta["version"] == export.VERSION


def test_bc_exports_its_binary_view_as_codes(tmp_path):
  model, config, state = _trained_state("bc", "adam")
  path = tmp_path / "bc.npz"
  export.export(path, state.params, method="bc")
  loaded = export.load(path)
  method = train.build_method(config, {"lr": jnp.float32(0)})
  view = method.view(state.params)  # what BC is evaluated with
  for name in ("Dense_0", "Dense_1", "Dense_2"):
    c = loaded[name]["kernel"]
    assert codes.is_codes(c) and c.grid.levels == 2
    np.testing.assert_array_equal(bits(codes.decode(c)),
                                  bits(view[name]["kernel"]))
  np.testing.assert_array_equal(bits(loaded["Dense_2"]["bias"]),
                                bits(state.params["Dense_2"]["bias"]))
  decoded = export.load_numpy(path)
  np.testing.assert_array_equal(bits(decoded["Dense_1/kernel"]),
                                bits(view["Dense_1"]["kernel"]))
  del model


def test_binary_vgg9_file_is_a_32nd_of_float32(tmp_path, rng):
  model = models.get("vgg9", 10)
  shapes = jax.eval_shape(
      lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False),
      jax.random.PRNGKey(0))["params"]
  params = jax.tree.map(
      lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  path = tmp_path / "vgg9.npz"
  meta = export.export(path, params, method="bc")
  code_entries = {e["data"] + ".npy": e for e in meta["leaves"]
                  if e["kind"] == "codes"}
  assert len(code_entries) == 9  # 7 conv + 2 dense kernels
  weights = sum(int(np.prod(e["shape"])) for e in code_entries.values())
  with zipfile.ZipFile(path) as z:
    code_bytes = sum(z.getinfo(name).file_size for name in code_entries)
  assert code_bytes < 4 * weights / 25  # about 1/32, npy headers included
  total_float32 = 4 * sum(int(np.prod(s.shape))
                          for s in jax.tree.leaves(shapes))
  assert os.path.getsize(path) < total_float32 / 25


def test_numpy_only_reader(tmp_path, rng):
  """The docstring's recipe and load_numpy run where qjax is never imported."""
  x = rng.normal(size=(9, 5)).astype(np.float32)
  params = {"a": {"kernel": codes.encode_nearest(x, Grid.binary(0.5)),
                  "bias": jnp.asarray(x[0])},
            "b": [codes.encode_nearest(x, Grid.kbit(3)),
                  codes.encode_nearest(x, Grid.kbit(9, 2.0))]}
  path = tmp_path / "n.npz"
  export.export(path, params)
  recipe = export.__doc__.split("what :func:`load_numpy` runs)::")[1]
  recipe = textwrap.dedent(recipe.split("\nDecoded values")[0])
  function = inspect.getsource(export.load_numpy)
  out = tmp_path / "decoded.npz"
  script = "\n".join([
      "import json, sys, zipfile", "import numpy as np", recipe,
      "recipe = load_numpy", function,
      f"a, b = recipe({str(path)!r}), load_numpy({str(path)!r})",
      "assert list(a) == list(b)",
      "assert all(np.array_equal(a[k], b[k]) for k in a)",
      "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'qjax')]",
      "assert not bad, bad",
      f"np.savez({str(out)!r}, **{{k.replace('/', '|'): v for k, v in "
      "a.items()})",
      "print(json.dumps(sorted(a)))"])
  result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, cwd=str(tmp_path), timeout=120)
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout) == sorted(
      ["a/bias", "a/kernel", "b/0", "b/1"])
  with np.load(out) as got:
    decoded = {k.replace("|", "/"): got[k] for k in got.files}
  assert_numpy_decodes({k: decoded[k] for k in export.load_numpy(path)},
                       params)
  loaded = export.load(path)
  assert isinstance(loaded["b"], list)
  assert_same_tree(loaded, params)


def test_bare_array_and_errors(tmp_path):
  c = codes.encode_nearest(jnp.ones((5,)), Grid.ternary(1.0))
  export.export(tmp_path / "c.npz", c)
  assert_same_tree(export.load(tmp_path / "c.npz"), c)
  params = {"kernel": jnp.ones((3, 3)), "bias": jnp.zeros(3)}
  with pytest.raises(ValueError, match="no quantized view"):
    export.export(tmp_path / "x.npz", params, method="fp",
                  grid=Grid.binary(1.0))
  with pytest.raises(ValueError, match="method must be one of"):
    export.export(tmp_path / "x.npz", params, method="xnor")
  with pytest.raises(ValueError, match="stores its quantized weights"):
    export.export(tmp_path / "x.npz", params, method="sr")
  _, _, state = _trained_state("r", "sgd", steps=0)
  with pytest.raises(TypeError, match="not a TrainState"):
    export.export(tmp_path / "x.npz", state)
  export.export(tmp_path / "g.npz", params, grid=Grid.binary(1.0))
  assert codes.is_codes(export.load(tmp_path / "g.npz")["kernel"])
  with pytest.raises(ValueError, match="target has"):
    export.load(tmp_path / "g.npz", target={"w": params["kernel"]})
  (tmp_path / "bad.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="not a qjax export"):
    export.load(tmp_path / "bad.npz")
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".export-")]
