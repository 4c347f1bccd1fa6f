"""A decode step cut into one piece per device segment (cogvlm/parallel/segments.py): the cuts, and token-identical
decoding against the unsegmented DecodeSession, on the CPU (pieces eager) and, given a GPU, with CUDA graphs."""
from __future__ import annotations

import pytest
import torch

from cogvlm import CogVLM
from cogvlm.generate import DecodeSession
from cogvlm.parallel import device_map as dm
from cogvlm.parallel.segments import Segment, SegmentedStep, decode_devices, segments

from .test_device_map import image_case, tiny  # noqa: F401  (a fixture)

CPU, GPU0, GPU1 = torch.device("cpu"), torch.device("cuda:0"), torch.device("cuda:1")


def path(*devices):
    """Decode-path blocks of a 4-layer model on the given devices: embed, layers 0-3, norm, lm_head."""
    names = ["llm.embed"] + [f"llm.layers.{i}" for i in range(4)] + ["llm.norm", "llm.lm_head"]
    return dict(zip(names, devices, strict=True))


def test_segments_are_maximal_runs_on_one_device():
    assert segments(path(*[GPU0] * 7)) == [Segment(GPU0, list(path(*[GPU0] * 7)))]
    cut = segments(path(GPU0, GPU0, GPU0, GPU1, GPU1, GPU1, GPU1))
    assert [(s.device, s.blocks) for s in cut] == [
        (GPU0, ["llm.embed", "llm.layers.0", "llm.layers.1"]),
        (GPU1, ["llm.layers.2", "llm.layers.3", "llm.norm", "llm.lm_head"])]
    # Back and forth: a device holds two segments, each captured apart.
    cut = segments(path(GPU0, GPU0, GPU1, GPU1, GPU0, GPU0, CPU))
    assert [s.device for s in cut] == [GPU0, GPU1, GPU0, CPU]
    assert [len(s.blocks) for s in cut] == [2, 2, 2, 1]


def cpu_cuts(model) -> list[Segment]:
    """A CPU-only model cut as a 4-device map would be: [embed, layers.0], [layers.1], [norm], [lm_head]."""
    names = list(decode_devices(model))
    return [Segment(CPU, names[:2]), Segment(CPU, names[2:-2]), Segment(CPU, names[-2:-1]), Segment(CPU, names[-1:])]


def batch_of_two(case):
    """The image case and a left-padded shorter text-only row, so that padding and key_valid copies matter."""
    ids, types, pixels = case["input_ids"], case["token_type_ids"], case["pixel_values"]
    L = ids.shape[1]
    short = torch.zeros_like(ids)
    short[0, L - 5:] = ids[0, -5:]
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, :L - 5] = 0
    return torch.cat([ids, short]), torch.cat([types, torch.zeros_like(types)]), mask, pixels


def decode(model, inputs, steps, segmented=False, cuts=None, cuda_graph=False, session=None):
    """Greedy steps after a prefill: the logits of each step, (steps + 1, B, V)."""
    ids, types, mask, pixels = inputs
    session = session or DecodeSession(model, ids.shape[0], ids.shape[1] + steps, cuda_graph=False)
    logits = [session.prefill(ids, types, mask, pixels)]
    stepper = SegmentedStep(model, session.caches, session.key_valid, session.cache_pos, session.next_pos,
                            session.tokens, cuda_graph=cuda_graph, cuts=cuts) if segmented else None
    for _ in range(steps):
        tokens = logits[-1].argmax(-1)
        logits.append((stepper.step(tokens) if stepper else session.step(tokens)).clone())
    return torch.stack([t.to(logits[0].device) for t in logits]), session, stepper


def test_segmented_steps_equal_the_session_exactly(tiny):  # noqa: F811
    model = CogVLM.from_pretrained(tiny, device="cpu", dtype=torch.float32)
    inputs = batch_of_two(image_case())
    reference, _, _ = decode(model, inputs, 6)
    same, session, stepper = decode(model, inputs, 6, segmented=True, cuts=cpu_cuts(model))
    assert len(stepper.pieces) == 4 and stepper.pieces[1].state[0] is not session.key_valid
    assert torch.equal(same, reference)
    for piece in stepper.pieces:  # every copy of the step state advanced with the session's
        for mine, theirs in zip(piece.state or (), (session.key_valid, session.cache_pos, session.next_pos)):
            assert torch.equal(mine, theirs)
    # The same buffers serve a second conversation (prefill resets the session): sync() brings the copies along.
    swapped = [t.flip(0) for t in inputs[:3]] + [inputs[3]]  # the rows the other way round
    again = [session.prefill(*swapped)]
    stepper.sync()
    for _ in range(3):
        again.append(stepper.step(again[-1].argmax(-1)).clone())
    same_size = DecodeSession(model, 2, session.key_valid.shape[1], cuda_graph=False)  # the cache length counts
    fresh, _, _ = decode(model, swapped, 3, session=same_size)
    assert torch.equal(torch.stack(again), fresh)


def test_a_mapped_model_is_cut_where_its_weights_are(tiny):  # noqa: F811
    """With every block on the CPU the devices give one segment; the hooks of a map change nothing in a step."""
    model = CogVLM.from_pretrained(tiny, device="cpu", dtype=torch.float32)
    dm.apply_device_map(model, {"vision": "cpu", "adapter": "cpu", "llm": "cpu"})
    inputs = batch_of_two(image_case())
    reference, _, _ = decode(model, inputs, 3)
    same, _, stepper = decode(model, inputs, 3, segmented=True)
    assert len(stepper.pieces) == 1 and torch.equal(same, reference)
    with pytest.raises(ValueError, match="cover the decode path in order"):
        decode(model, inputs, 1, segmented=True, cuts=cpu_cuts(model)[::-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_graph_per_gpu_segment_gives_the_same_tokens(tiny):  # noqa: F811
    """cuda:0 and the CPU (or cuda:1 when there is one), back and forth (four pieces: [embed, layers.0] [layers.1]
    [norm] [lm_head]): graphs on the GPU pieces, eager on the CPU ones."""
    other = "cuda:1" if torch.cuda.device_count() > 1 else "cpu"
    one = CogVLM.from_pretrained(tiny, device="cuda:0", dtype=torch.float32)
    inputs = [t if t is None else t.to("cuda:0") for t in batch_of_two(image_case())]
    reference, _, _ = decode(one, inputs, 8)
    split = CogVLM.from_pretrained(tiny, device="cuda:0", dtype=torch.float32, device_map={
        "vision": "cuda:0", "adapter": "cuda:0", "embed": "cuda:0", "layers.0": "cuda:0", "layers.1": other,
        "norm": "cuda:0", "lm_head": other})
    for graph in (False, True):
        logits, _, stepper = decode(split, inputs, 8, segmented=True, cuda_graph=graph)
        assert [piece.device.type for piece in stepper.pieces] == ["cuda", torch.device(other).type, "cuda",
                                                                          torch.device(other).type]
        assert torch.equal(logits.argmax(-1).cpu(), reference.argmax(-1).cpu())
        torch.testing.assert_close(logits.cpu(), reference.cpu(), atol=1e-4, rtol=1e-4)
    assert stepper.pieces[0].graph is not None and stepper.pieces[2].graph is not None
    assert (stepper.pieces[1].graph is not None) == (other != "cpu")
