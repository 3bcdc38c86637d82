"""The batching queue (ldm.serve.queue) and what makes batching exact: compatible requests share a
batch up to the limit in arrival order, big ones split, positions and progress per request, a
bound that answers with a retry time, cancelling and interrupting; the U-Net's fixed batch shape
(ldm.speed) that makes a picture's pixels independent of the batch it ran in, checked end to end
against solo runs (the shape itself is tested with the other speed switches in test_fast_path.py);
and the memory-derived batch limit (ldm.serve.capacity)."""

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch

from ldm.serve.capacity import images_per_call, largest_size, unet_activation_elements, vae_decode_elements
from ldm.serve.queue import BatchKey, BatchQueue, ImageTask, Job, QueueFull
from serve_helpers import make_server, tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = BatchKey(model="m", mode="txt2img", width=32, height=32, steps=3, sampler="euler", cfg=7.5)


def job(n=1, key=KEY, prompt="p", seed=0):
    return Job(key, [ImageTask(prompt, "", seed + k) for k in range(n)])


def test_compatible_jobs_share_a_batch_in_arrival_order_up_to_the_limit():
    q = BatchQueue(max_batch=4, max_waiting=100)
    other = dataclasses.replace(KEY, steps=20)
    a, b, c, d = job(2), job(1, key=other), job(1), job(3)
    for j in (a, b, c, d):
        q.submit(j)
    batch = q.next_batch(0)
    # the head (a) first, then c rides along, then d gives what fits; b (other steps) waits
    assert [(s.job, s.start, s.stop) for s in batch.slices] == [(a, 0, 2), (c, 0, 1), (d, 0, 1)]
    assert batch.size == 4 and q.position(b) == 1 and q.position(d) == 0  # 0: pictures of d are being made
    q.finish(batch, 1.0)
    assert q.position(b) == 1 and q.position(d) == 2
    assert q.next_batch(0).slices[0].job is b  # the head of the line runs next, whatever the rest
    q.finish(q.running, 1.0)
    assert [(s.job, s.start, s.stop) for s in q.next_batch(0).slices] == [(d, 1, 3)]


def test_a_batch_that_is_not_full_waits_for_company_from_its_heads_arrival():
    q = BatchQueue(max_batch=3, max_waiting=10, batch_wait=0.5)
    first = job(1)
    q.submit(first)
    taken = []
    worker = threading.Thread(target=lambda: taken.append(q.next_batch(5)))
    worker.start()
    time.sleep(0.1)
    second, third = job(1), job(1)
    q.submit(second)
    q.submit(third)  # the batch is full: it starts before the 0.5 s are up
    worker.join(5)
    assert [s.job for s in taken[0].slices] == [first, second, third]
    assert time.monotonic() - first.created < 0.45
    q.finish(taken[0], 1.0)
    lone = job(1)
    q.submit(lone)
    start = time.monotonic()
    assert [s.job for s in q.next_batch(5).slices] == [lone]  # alone: starts when its wait is over
    assert 0.4 < time.monotonic() - start < 2.0


def test_by_default_a_batch_waits_a_tenth_of_the_recent_batches_time():
    q = BatchQueue(max_batch=3, max_waiting=10)
    q.submit(job(1))
    start = time.monotonic()
    q.finish(q.next_batch(5), 3.0)  # no batch ran before: no wait at all
    assert time.monotonic() - start < 0.2
    q.submit(job(1))
    q.next_batch(5)
    assert 0.25 < time.monotonic() - start < 2.0  # a tenth of 3 s


def test_a_full_line_refuses_with_a_retry_time_and_keeps_what_waits():
    q = BatchQueue(max_batch=2, max_waiting=3)
    q.submit(job(2))
    with pytest.raises(QueueFull, match=r"2 images waiting, at most 3") as e:
        q.submit(job(2))
    assert e.value.retry_after >= 1
    assert q.status()["queued_images"] == 2
    q.submit(job(1))  # what still fits is taken
    batch = q.next_batch(0)
    q.finish(batch, 0.5)  # 2 pictures in 0.5 s: 4 pictures per second
    q.submit(job(2))
    with pytest.raises(QueueFull) as e:
        q.submit(job(3))
    assert e.value.retry_after == 1  # 3 waiting + 3 new - 3 allowed = 3 pictures at 4/s


def test_cancel_frees_the_slot_and_interrupt_answers_a_waiting_job_at_once():
    q = BatchQueue(max_batch=1, max_waiting=10)
    a, b, c = job(1), job(2), job(1)
    for j in (a, b, c):
        q.submit(j)
    q.cancel(b)
    assert b.future.cancelled() and q.get(b.id) is None
    assert q.status()["queued_images"] == 2 and q.position(c) == 2
    q.interrupt(c)
    assert c.future.result().images == [] and c.future.result().interrupted
    assert q.next_batch(0).slices[0].job is a and q.next_batch(0) is None


def test_progress_counts_finished_pictures_and_the_running_step():
    j = job(4, key=dataclasses.replace(KEY, steps=10))
    q = BatchQueue(max_batch=2, max_waiting=10)
    q.submit(j)
    q.next_batch(0)
    j.step = 5
    assert j.progress() == pytest.approx((0 + 2 * 0.5) / 4)
    j.finished = 2
    q.finish(q.running, 1.0)
    assert j.state == "queued" and j.progress() == pytest.approx(0.5)
    strength = dataclasses.replace(KEY, steps=10, strength=0.35, mode="img2img")
    assert strength.sampling_steps == 3  # img2img runs int(steps * strength) steps


def test_a_reused_task_id_is_refused():
    q = BatchQueue(max_batch=1, max_waiting=10)
    q.submit(Job(KEY, [ImageTask("p", "", 0)], job_id="t1"))
    with pytest.raises(ValueError, match="already in use"):
        q.submit(Job(KEY, [ImageTask("p", "", 0)], job_id="t1"))


# ---------------------------------------------------------------------------------------------
# Exact batching
# ---------------------------------------------------------------------------------------------


def pictures(result):
    return [np.asarray(im) for im in result.images]


def test_batched_requests_get_the_pixels_of_their_solo_runs():
    """Requests that share a batch (including one of two pictures, and one that must wait for
    the next batch because its steps differ) get exactly the pictures each gets alone."""
    server = make_server(max_batch=4, start=False)
    server.catalog.pipeline(server.catalog.current)
    other = dataclasses.replace(KEY, model=server.catalog.current, steps=4, sampler="euler_a")
    key = dataclasses.replace(other, steps=3)

    def jobs():
        return [Job(key, [ImageTask("a red circle", "", 10), ImageTask("a red circle", "", 11)]),
                Job(key, [ImageTask("a blue square", "blurry", 20)]),
                Job(other, [ImageTask("a green star", "", 30)]),
                Job(key, [ImageTask("a yellow moon", "", 40)])]

    sizes = []
    server.queue.next_batch = _recording(server.queue.next_batch, sizes)
    together = jobs()
    for j in together:
        server.queue.submit(j)
    server.worker.start()
    batched = [pictures(j.future.result(timeout=120)) for j in together]
    solo = []
    for j in jobs():
        server.queue.submit(j)
        solo.append(pictures(j.future.result(timeout=120)))
    server.stop()
    assert sizes == [4, 1, 2, 1, 1, 1]  # two batches (2 + 1 + 1 pictures, then the other steps), then solo runs
    for b, s in zip(batched, solo):
        assert len(b) == len(s) and all(np.array_equal(x, y) for x, y in zip(b, s))
    assert not np.array_equal(batched[0][0], batched[0][1])  # seeds 10 and 11 differ


def _recording(next_batch, sizes):
    def wrapped(timeout=None):
        batch = next_batch(timeout)
        if batch is not None:
            sizes.append(batch.size)
        return batch

    return wrapped


def test_worker_fails_every_job_of_a_broken_batch_and_goes_on():
    server = make_server(max_batch=4)
    key = dataclasses.replace(KEY, model=server.catalog.current, sampler="no_such_sampler")
    bad, good = Job(key, [ImageTask("x", "", 0)]), Job(dataclasses.replace(key, sampler="euler"), [ImageTask("x", "", 0)])
    server.queue.submit(bad)
    server.queue.submit(good)
    with pytest.raises(ValueError, match="unknown sampler"):
        bad.future.result(timeout=60)
    assert len(good.future.result(timeout=60).images) == 1
    server.stop()


# ---------------------------------------------------------------------------------------------
# Memory-derived limit
# ---------------------------------------------------------------------------------------------


def test_activation_estimate_covers_the_skips_the_unet_keeps():
    """The estimate is at least the encoder outputs the U-Net holds for its decoder (measured with
    hooks) and within a few times of it."""
    pipe = tiny_pipeline()
    sizes = []
    hooks = [b.register_forward_hook(lambda m, i, o: sizes.append(o[0].numel())) for b in pipe.unet.input_blocks]
    with torch.inference_mode():
        pipe.unet(torch.zeros(1, 4, 24, 40), torch.zeros(1), torch.zeros(1, 77, 64))
    for h in hooks:
        h.remove()
    estimate = unet_activation_elements(pipe.unet.cfg, 24, 40)
    assert sum(sizes) <= estimate <= 8 * sum(sizes)


def test_batch_limit_follows_free_memory_and_size():
    pipe = tiny_pipeline()
    per_image = 2 * 4 * unet_activation_elements(pipe.unet.cfg, 64, 64)  # 256 px: 64x64 latents, fp32, CFG
    decode = 4 * vae_decode_elements(pipe.vae.cfg, 256, 256)  # once per batch: pictures decode one by one
    assert images_per_call(pipe, 256, 256, 64, free=10**12) == 64
    assert images_per_call(pipe, 256, 256, 64, free=int((5.5 * per_image + decode) / 0.8)) == 5
    assert images_per_call(pipe, 256, 256, 64, free=0) == 1  # never less than one
    assert images_per_call(pipe, 512, 512, 64, free=10**9) < images_per_call(pipe, 256, 256, 64, free=10**9) < 64
    side = largest_size(pipe, 8, free=10**10)
    assert images_per_call(pipe, side, side, 8, free=10**10) == 8
    assert side == 2048 or images_per_call(pipe, side + 64, side + 64, 8, free=10**10) < 8
