"""Loading captioned images: the shipped sets load with `datasets`; bad folders are named precisely."""

import json

import pytest
import torch
from PIL import Image

from lora_nb.course.tiny import TINY_SD_PATH, build_tokenizer
from lora_nb.course.world import DATASETS, IMAGE_SIZE
from lora_nb.data import DataError, ImageTransform, check_imagefolder, load_captioned_dataset, tokenize

DATA = TINY_SD_PATH.parent


@pytest.mark.parametrize("name", list(DATASETS))
def test_shipped_sets_load_with_datasets(name):
    from datasets import load_dataset

    dataset = load_dataset("imagefolder", data_dir=str(DATA / name), split="train")
    assert {"image", "text"} <= set(dataset.column_names)
    assert min(dataset[0]["image"].size) == IMAGE_SIZE and dataset[0]["text"].strip()


def make_folder(tmp_path, lines, images=("a.png",)):
    for name in images:
        Image.new("RGB", (8, 8), "red").save(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return tmp_path


def test_missing_metadata_is_named(tmp_path):
    with pytest.raises(DataError, match="metadata.jsonl is missing"):
        check_imagefolder(tmp_path)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        check_imagefolder(tmp_path / "nowhere")


def test_missing_caption_key_names_line_and_key(tmp_path):
    make_folder(tmp_path, [{"file_name": "a.png", "text": "ok"}, {"file_name": "a.png", "caption": "x"}])
    with pytest.raises(DataError, match=r"line 2: no 'text' key"):
        check_imagefolder(tmp_path)


def test_empty_caption_is_named(tmp_path):
    make_folder(tmp_path, [{"file_name": "a.png", "text": "  "}])
    with pytest.raises(DataError, match="empty caption.*a.png"):
        check_imagefolder(tmp_path)


def test_missing_and_unreadable_images_are_named(tmp_path):
    make_folder(tmp_path, [{"file_name": "b.png", "text": "x"}])
    with pytest.raises(DataError, match="image file not found.*b.png"):
        check_imagefolder(tmp_path)
    (tmp_path / "b.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="unreadable image.*b.png"):
        check_imagefolder(tmp_path)


def test_wrong_columns_are_named():
    with pytest.raises(DataError, match=r"line 1: no 'prompt' key"):
        load_captioned_dataset(DATA / "subject", caption_column="prompt")
    with pytest.raises(DataError, match=r"image column 'picture' not in .*columns are \['image'"):
        load_captioned_dataset(DATA / "subject", image_column="picture")


def test_transform_resizes_crops_flips_and_scales():
    image = Image.new("RGB", (40, 20), "white")
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    out = ImageTransform(16, center_crop=False, random_flip=False)(image)
    assert out.shape == (3, 16, 16) and out.min() >= -1 and out.max() <= 1
    centre = ImageTransform(16, center_crop=True)(image)
    # resized to 32x16, the centre crop keeps columns 8..24: red (green = -1) on the left, white on the right
    assert centre[1, :, :6].max() < -0.8 and centre[1, :, 10:].min() > 0.8
    flipper = ImageTransform(16, center_crop=True, random_flip=True)
    import random

    outs = {bool(torch.equal(flipper(image, random.Random(i)), centre)) for i in range(20)}
    assert outs == {True, False}  # both orientations occur
    assert torch.equal(flipper(image, random.Random(3)), flipper(image, random.Random(3)))


def test_tokenize_pads_to_model_length():
    ids = tokenize(build_tokenizer(), ["a red circle", "a"])
    assert ids.shape == (2, 77)
