"""vlm.processor: the marker rules, both batchers' padding sides and label masking."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlm.errors import InputError
from vlm.processor import IGNORE_INDEX


def _image(seed: int, size=(40, 48)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], generator=g) * 255).to(torch.uint8).numpy())


def test_typed_markers_are_stripped(tiny_model):
    p = tiny_model.processor
    assert p.strip_markers("<image> what is <image>this?") == " what is this?"
    assert p.strip_markers("no marker") == "no marker"


def test_one_marker_per_image_is_put_in_front_unless_the_text_has_one(tiny_model):
    p = tiny_model.processor
    assert p.user_turn("Compare.", 2) == {"role": "user", "content": "<image>\n<image>\nCompare."}
    assert p.user_turn("Hello", 0) == {"role": "user", "content": "Hello"}
    assert p.user_turn("Look at <image> here", 1)["content"] == "Look at <image> here"


def test_with_markers_goes_to_the_first_user_turn_and_only_when_none(tiny_model):
    p = tiny_model.processor
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What?"},
            {"role": "assistant", "content": "A chest."}, {"role": "user", "content": "And?"}]
    marked = p.with_markers(chat, 1)
    assert [m["content"] for m in marked] == ["Be brief.", "<image>\nWhat?", "A chest.", "And?"]
    assert chat[1]["content"] == "What?", "the caller's messages are not changed"
    already = [{"role": "user", "content": "<image>\nWhat?"}, {"role": "user", "content": "And?"}]
    assert p.with_markers(already, 1) == already
    assert p.with_markers(chat, 0)[1]["content"] == "What?"


def test_parts_become_text_with_markers_from_image_parts_only(tiny_model):
    p = tiny_model.processor
    parts = [{"type": "text", "text": "Look <image> here:"}, {"type": "image"}, {"type": "text", "text": "and"},
             {"type": "image"}]
    (message,) = p.with_markers([{"role": "user", "content": parts}], 2)
    assert message["content"] == "Look  here:\n<image>\nand\n<image>"
    assert p.encode([{"role": "user", "content": parts}]).num_images == 2
    with pytest.raises(InputError, match="content part"):
        p.with_markers([{"role": "user", "content": [{"type": "audio"}]}], 0)


def test_marker_count_mismatch_is_a_clear_input_error(tiny_model):
    p = tiny_model.processor
    two = [{"role": "user", "content": "<image>\n<image>\nCompare."}]
    with pytest.raises(InputError, match="has 2 <image> markers but 1 images; it needs one marker per image"):
        p.generation_batch([two], [[_image(0)]])
    with pytest.raises(InputError, match="has 0 <image> markers but 1 images"):
        p.training_batch([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]],
                         [[_image(1)]])


def test_generation_batch_is_left_padded(tiny_model):
    p = tiny_model.processor
    short = [{"role": "user", "content": "<image>\nHi"}]
    long = [{"role": "user", "content": "Is there a pleural effusion in the left hemithorax or not?"}]
    batch = p.generation_batch([short, long], [[_image(2)], []])
    lengths = [len(p.encode(m, add_generation_prompt=True).input_ids) for m in (short, long)]
    assert lengths[0] != lengths[1]
    width = max(lengths)
    assert batch.input_ids.shape == batch.attention_mask.shape == (2, width)
    for row, n in enumerate(lengths):
        assert batch.attention_mask[row].tolist() == [0] * (width - n) + [1] * n
        assert (batch.input_ids[row, :width - n] == tiny_model.tokenizer.pad_token_id).all()
    assert batch.pixel_values.shape[0] == 1
    assert torch.equal(batch.pixel_values, tiny_model.preprocess([_image(2)]))
    assert p.generation_batch([long], [[]]).pixel_values is None


def test_training_batch_is_right_padded_and_learns_only_replies(tiny_model):
    p = tiny_model.processor
    tok = tiny_model.tokenizer
    first = [{"role": "user", "content": "<image>\nIs the heart enlarged?"}, {"role": "assistant", "content": "Yes."},
             {"role": "user", "content": "Effusion?"}, {"role": "assistant", "content": "No."}]
    second = [{"role": "user", "content": "<image>\n<image>\nSame?"}, {"role": "assistant", "content": "Same."}]
    batch = p.training_batch([first, second], [[_image(3)], [_image(4), _image(5, (70, 20))]])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    lengths = [len(p.encode(m).input_ids) for m in (first, second)]
    assert ids.shape == labels.shape == mask.shape == (2, max(lengths))
    assert batch["pixel_values"].shape[0] == 3
    for row, n in enumerate(lengths):
        assert mask[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert (labels[row, n:] == IGNORE_INDEX).all()
        learned = labels[row] != IGNORE_INDEX
        assert torch.equal(labels[row][learned], ids[row][learned])
        assert not learned[ids[row] == tiny_model.image_token_id].any()
    assert tok.decode(ids[0][labels[0] != IGNORE_INDEX]) == "Yes.<|im_end|>\nNo.<|im_end|>\n"
    assert tok.decode(ids[1][labels[1] != IGNORE_INDEX]) == "Same.<|im_end|>\n"
    assert (ids[1] == tiny_model.image_token_id).sum() == 2 * tiny_model.num_image_tokens
