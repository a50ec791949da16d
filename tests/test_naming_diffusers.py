"""DiffusersGenerator through the real loading and sampling path: a tiny Stable Diffusion pipeline with random weights,
built from configs, saved, and loaded back with AutoPipelineForText2Image; and the on-disk render cache."""

import numpy as np
import pytest
import torch

from nacosae.naming.generators import DiffusersGenerator, RenderCache

SIZE = 16


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    from nacosae.naming.tiny import save_tiny_sd_pipeline

    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipe", size=SIZE)


def _pixels(render):
    return np.asarray(render.image, dtype=np.int16)


def test_tiny_pipeline_renders_deterministic_images_per_seed(tiny_pipeline_dir):
    gen = DiffusersGenerator(tiny_pipeline_dir, steps=2, guidance=0.0, size=SIZE, batch_size=4)
    r = gen.render("a red stop sign", [0, 1, 2])
    assert [x.image.size for x in r] == [(SIZE, SIZE)] * 3 and all(x.image.mode == "RGB" for x in r)
    assert not np.array_equal(_pixels(r[0]), _pixels(r[1]))  # different seeds, different images
    alone = gen.render("a red stop sign", [1])[0]  # one generator per image: the batch does not matter
    assert np.abs(_pixels(alone) - _pixels(r[1])).max() <= 1
    other = gen.render("a blue whale", [1])[0]
    assert not np.array_equal(_pixels(other), _pixels(r[1]))  # the prompt reaches the image
    # classifier-free guidance path too
    cfg = DiffusersGenerator(tiny_pipeline_dir, steps=1, guidance=3.0, size=SIZE)
    assert cfg.render("a cat", [5])[0].image.size == (SIZE, SIZE) and cfg.id != gen.id


def test_render_cache_hits_across_instances(tiny_pipeline_dir, tmp_path):
    gen = DiffusersGenerator(tiny_pipeline_dir, steps=1, size=SIZE, cache_dir=tmp_path / "renders")
    first = gen.render("a dog", [3, 4])
    assert len(gen.cache) == 2 and all(tmp_path in __import__("pathlib").Path(x.ref).parents for x in first)
    again = DiffusersGenerator(tiny_pipeline_dir, steps=1, size=SIZE, cache_dir=tmp_path / "renders")

    def broken_pipe(*args, **kwargs):
        raise AssertionError("a cached render was generated again")

    again.pipe = broken_pipe
    hit = again.render("a dog", [4, 3])
    assert [x.ref for x in hit] == [first[1].ref, first[0].ref]
    assert np.array_equal(_pixels(hit[1]), _pixels(first[0]))  # PNG: lossless


def test_render_cache_index_survives_a_torn_line(tmp_path):
    from PIL import Image

    cache = RenderCache(tmp_path)
    im = Image.new("RGB", (4, 4), (200, 10, 10))
    cache.put("gen", "a prompt", 0, im)
    cache.put("gen", "a prompt", 1, im)
    with open(tmp_path / "index.jsonl", "a") as f:
        f.write('{"key": "abc", "gener')  # a writer killed mid-line
    reopened = RenderCache(tmp_path)
    assert len(reopened) == 2 and reopened.get("gen", "a prompt", 1) is not None
    assert reopened.get("gen", "a prompt", 2) is None and reopened.get("other-gen", "a prompt", 0) is None
    assert not list(tmp_path.rglob("*.tmp"))


def test_bad_settings_are_refused(tiny_pipeline_dir):
    with pytest.raises(ValueError, match="multiple of 8"):
        DiffusersGenerator(tiny_pipeline_dir, size=20)
    with pytest.raises(ValueError, match="dtype"):
        DiffusersGenerator(tiny_pipeline_dir, dtype="float64")
