#include "unmapper.h"

#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <system_error>
#include <thread>
#include <utility>

#include "promise-worker.h"

namespace nodekvm {
namespace {

struct Unmapper {
  std::mutex lock;
  std::condition_variable queued;
  std::condition_variable done;
  std::deque<std::pair<void*, size_t>> queue;
  // Unmaps queued so far, and finished so far: a waiter waits for the count at its call.
  uint64_t queuedCount = 0;
  uint64_t doneCount = 0;
  bool started = false;
  bool unavailable = false;
};

// Never destroyed: the detached thread may still run while static destructors do, at exit.
Unmapper& TheUnmapper() {
  static Unmapper* unmapper = new Unmapper();
  return *unmapper;
}

void RunUnmapper(Unmapper* unmapper) {
  // Signals sent to the process go to its other threads, as on libuv's pool.
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, nullptr);
  pthread_setname_np(pthread_self(), "kvm-unmap");
  std::unique_lock<std::mutex> hold(unmapper->lock);
  for (;;) {
    unmapper->queued.wait(hold, [&] { return !unmapper->queue.empty(); });
    auto [addr, size] = unmapper->queue.front();
    unmapper->queue.pop_front();
    hold.unlock();
    munmap(addr, size);
    hold.lock();
    unmapper->doneCount++;
    unmapper->done.notify_all();
  }
}

// Keeps this library loaded for the rest of the process, as the unmapper's thread runs its code:
// Node unloads an addon that only a worker thread loaded when that thread ends.
bool PinThisLibrary() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&RunUnmapper), &info) == 0 || info.dli_fname == nullptr) return false;
  return dlopen(info.dli_fname, RTLD_NOW | RTLD_NODELETE) != nullptr;
}

class SettleWorker : public PromiseWorker {
 public:
  SettleWorker(Napi::Env env, uint64_t until) : PromiseWorker(env), until_(until) {}
  void Execute() override {
    Unmapper& unmapper = TheUnmapper();
    std::unique_lock<std::mutex> hold(unmapper.lock);
    unmapper.done.wait(hold, [&] { return unmapper.doneCount >= until_; });
  }

 private:
  uint64_t until_;
};

}  // namespace

void UnmapLater(void* addr, size_t size) {
  Unmapper& unmapper = TheUnmapper();
  {
    std::lock_guard<std::mutex> guard(unmapper.lock);
    if (!unmapper.started && !unmapper.unavailable) {
      try {
        if (!PinThisLibrary()) throw std::system_error(std::make_error_code(std::errc::not_supported));
        std::thread(RunUnmapper, &unmapper).detach();
        unmapper.started = true;
      } catch (const std::system_error&) {
        // No thread to be had (a sandbox that forbids clone, say): unmapped here, as before.
        unmapper.unavailable = true;
      }
    }
    if (unmapper.started) {
      unmapper.queue.emplace_back(addr, size);
      unmapper.queuedCount++;
      unmapper.queued.notify_one();
      return;
    }
  }
  munmap(addr, size);
}

Napi::Value MemoryUnmapsSettled(const Napi::CallbackInfo& info) {
  uint64_t until;
  {
    Unmapper& unmapper = TheUnmapper();
    std::lock_guard<std::mutex> guard(unmapper.lock);
    until = unmapper.queuedCount;
  }
  return PromiseWorker::Start(new SettleWorker(info.Env(), until));
}

}  // namespace nodekvm
