// Host batches to the GPU on a copy stream of their own, one batch ahead (issue 12's data path).
//
// A non-blocking copy from pinned memory issued on the compute stream still waits in that stream
// for the kernels queued before it, and the next kernels wait for it: the 328 MB of a batch of
// 256 ten-second clips (float32) were copy time added to every step on the H200. Issued on a
// side stream before the previous batch's step is queued, the copy runs on the copy engine in
// parallel with that step's forward and backward; the compute stream then waits only for the
// copy's event. (Started after the step, it would overlap little: the trainer waits for the
// device at the loss and, with a CUDA graph, a reducer or clipping, after backward too.)
//
//   DeviceCopier copier(device);
//   DeviceCopier::InFlight next = copier.Start(batch_n1.waveforms);  // before step n is queued
//   ... step n ...
//   at::Tensor x = copier.Take(std::move(next));                      // at step n + 1
//
// Start() allocates the device tensor on the copy stream and records an event after the copy;
// Take() makes the current stream wait for that event and records the tensor's use on the
// current stream (the caching allocator then keeps its memory until the work queued there is
// done). On a CPU device, or a build without CUDA torch, Start() returns the host tensor itself
// and Take() hands it back: the step's own .to(device) is then the copy, as before.
//
// Implemented in cuda_graph_step.cc, the translation unit that includes the CUDA headers (torch
// translation units are few: each costs minutes of CI). Not thread-safe; one per training loop.
#ifndef AVIARY_WORKER_DEVICE_COPY_H_
#define AVIARY_WORKER_DEVICE_COPY_H_

#include <memory>

#include <ATen/ATen.h>

namespace aviary::worker {

class DeviceCopier {
 public:
  struct Event;  // a CUDA event (cuda_graph_step.cc)
  struct InFlight {
    at::Tensor tensor;             // on the device once Take() returns it
    std::shared_ptr<Event> event;  // null: nothing to wait for
  };

  explicit DeviceCopier(c10::Device device);
  ~DeviceCopier();
  DeviceCopier(const DeviceCopier&) = delete;
  DeviceCopier& operator=(const DeviceCopier&) = delete;

  // Whether copies run on a stream of their own (a CUDA device in a CUDA build).
  bool overlaps() const { return stream_ != nullptr; }
  // Starts copying `host` (pinned, for the copy to be asynchronous) to the device. The host
  // tensor must be written by the host (the copy waits for no stream; the loader's batches are);
  // a tensor already on a device comes back from Take() as it is.
  InFlight Start(const at::Tensor& host);
  // The copied tensor, for work queued on the current stream from now on.
  at::Tensor Take(InFlight in_flight);
  // A mark after the work queued so far on the current stream (null without a copy stream: on
  // a CPU the work is done when the call that queued it returns). Await() blocks the host until
  // that work is done, leaving what was queued after the mark queued: a loop that awaits the
  // previous round's mark keeps the device one round ahead of the host without reading a value
  // back (Tensor::item() waits for everything queued on the stream).
  std::shared_ptr<Event> Mark();
  static void Await(const std::shared_ptr<Event>& mark);

 private:
  struct Stream;  // the copy stream (cuda_graph_step.cc)
  c10::Device device_;
  std::unique_ptr<Stream> stream_;
};

}  // namespace aviary::worker

#endif  // AVIARY_WORKER_DEVICE_COPY_H_
