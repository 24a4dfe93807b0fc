"""Server side of `sync.method=broadcast` to a remote vLLM server: weights stream from the learner into the server's
engine over a `WeightChannel` (NCCL between GPUs, gloo on CPU), with no storage shared between the two machines.

Start the server with this class as vLLM's worker extension, from an environment where asymre is installed:

    VLLM_SERVER_DEV_MODE=1 vllm serve MODEL --worker-extension-cls asymre.rollout.vllm_receiver.WeightReceiver

vLLM 0.32 mixes the class into its GPU/CPU worker (`vllm/v1/worker/worker_base.py`, `WorkerWrapperBase
.init_worker`: `worker_extension_cls` is added to the worker class's bases), so its methods run in the engine's
worker process, next to the model, and the dev endpoint `/collective_rpc` calls them by name. The learner's side is
`asymre.rollout.remote.RemoteVLLMGenerator`: it asks the worker to join a channel whose store listens on the
learner's `sync.channel_host` (the secret travels in that request's body: keep the server on loopback, or reach it
over HTTPS), then, per push, to receive the tensors it sends while the request is open. The tensors load through
`asymre.rollout.vllm_engine.refresh_weights` (or vLLM's `reload_weights` for quantized models), as a push to an
in-process engine does. Only one worker per server (tensor_parallel_size=1): each worker would need its own
member of the channel.
"""

from __future__ import annotations

RECEIVER = "asymre.rollout.vllm_receiver.WeightReceiver"
PROTOCOL = 3  # bumped when the learner's and the server's halves stop understanding each other


class WeightReceiver:
    """Mixed into vLLM's worker: `self` is the worker (its model runner, device and config)."""

    _asymre_channel = None

    def asymre_receiver(self) -> dict:
        """The protocol this server speaks and its device type (the learner checks both, and that exactly one worker
        answered): the channel is NCCL when the learner is on a GPU, so the server's worker must be too."""
        from asymre.sync import torch_cuda_available

        return {"protocol": PROTOCOL, "device": "cuda" if torch_cuda_available() else "cpu"}

    def asymre_open_channel(self, host: str, port: int, backend: str, timeout_s: float, secret: str) -> bool:
        """Join the learner's channel as its rank 1 (a channel left from an earlier learner worker is closed first)."""
        from asymre.sync import WeightChannel, torch_cuda_available

        if backend == "nccl" and not torch_cuda_available():
            raise RuntimeError("the learner streams its weights over NCCL (it is on a GPU), but this vLLM server has no GPU: "
                               "use sync.method=disk")
        self.asymre_close_channel()
        self._asymre_channel = WeightChannel(host, port, 1, backend, timeout_s, secret=secret).connect()
        return True

    def asymre_receive(self, manifest: dict) -> int:
        """Load the tensors the learner sends now (described by `manifest`, `WeightChannel.describe`); the number of
        names loaded. The caller resets the prefix cache afterwards."""
        from asymre.rollout.vllm_engine import refresh_supported, refresh_weights

        channel = self._asymre_channel
        if channel is None:
            raise RuntimeError("asymre_receive: no weight channel is open (asymre_open_channel first)")
        weights = channel.receive(manifest)
        try:
            if refresh_supported(self):
                return refresh_weights(self, weights)
            self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
            return len(manifest["tensors"])
        except BaseException:
            self.asymre_close_channel()  # the stream is out of step with the learner: the next push opens a new one
            raise

    def asymre_close_channel(self) -> bool:
        channel, self._asymre_channel = self._asymre_channel, None
        if channel is not None:
            channel.close()
        return True
