"""How one device runs Janus, for a scheduler that knows no device (server/engine/scheduler.py).

A runtime owns the model, its KV cache, the running sequences and their sampling (temperature,
top-k/p, penalties, the per-request seed: a seed gives the same output alone or batched), and
whatever threads, programs or streams its device needs. The scheduler calls, from one thread:

    runtime.free_rows -> int             cache rows a new request may take now
    runtime.rows_in_use -> int           rows of the running sequences
    runtime.start(kind, rid, payload) -> Future
        kind "understand" (one row) or "generate" (two rows per image); takes the rows at once and
        prefills, now, in the background, or in pieces between steps. Its result is the request's
        first events (its first token, or its first image step), once it has joined the running rows;
        its exception, why it failed (the rows are free again).
    runtime.poll()                       takes in what the background finished (call between steps)
    runtime.run_piece() -> bool          runs one piece of the work it does on the scheduler's thread
                                         between steps (a chunk of a prompt, a piece of a VQ decode: about
                                         a step's time); True while it has more, or results for poll()
    runtime.background() -> [Future]     futures that finish when poll() has something to take in (the
                                         scheduler waits on them when nothing steps)
    runtime.step() -> [StepEvent]        one step over every running row
    runtime.step_each() -> ([StepEvent], {rid: error})
                                         the same, one sequence at a time, after step() raised
    runtime.remove(rid)                  drop a request, running or still starting
    runtime.decode_images(codes) -> Future[(images, seconds)]
                                         VQ-decode finished codes [n, 576] to [n, 384, 384, 3] uint8
    runtime.previews(rid) -> [n, 24, 24, 3] uint8 | None
                                         the colours of an image request's codes so far
    runtime.describe() -> dict           device, runtime, precision, programs, for /ready and the logs

StepEvent (model/generation.py): key (the rid), kind "token" | "progress" | "text_done" |
"codes_done", and token, step, finish_reason or codes.

Runtimes: eager.EagerRuntime (eager Paddle on any device: the reference every other runtime is
tested against), gpu.GpuRuntime (the eager runtime with model/static_step.py's decode step: what a
GPU runs), cpu.CpuRuntime (OpenVINO programs: what a CPU runs).
"""
