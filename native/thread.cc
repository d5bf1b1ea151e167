#include "thread.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>

#include "errors.h"

namespace nodekvm {

// setThreadName(name): at most 15 bytes (the kernel's TASK_COMM_LEN less the NUL).
Napi::Value SetThreadName(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString()) ThrowTypeError(env, "name must be a string");
  std::string name = info[0].As<Napi::String>().Utf8Value();
  if (name.empty() || name.size() > 15 || name.find('\0') != std::string::npos) {
    ThrowInvalidValueError(env, "name must be 1..15 bytes without NUL");
  }
  int err = pthread_setname_np(pthread_self(), name.c_str());
  if (err != 0) ThrowSyscallError(env, err, "pthread_setname_np");
  return env.Undefined();
}

// setThreadAffinity(cpus: number[]): pins the calling thread to these host CPUs.
Napi::Value SetThreadAffinity(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsArray()) ThrowTypeError(env, "cpus must be an array of CPU numbers");
  auto cpus = info[0].As<Napi::Array>();
  if (cpus.Length() == 0) ThrowInvalidValueError(env, "cpus must not be empty");
  cpu_set_t set;
  CPU_ZERO(&set);
  for (uint32_t i = 0; i < cpus.Length(); i++) {
    Napi::Value v = cpus.Get(i);
    if (!v.IsNumber()) ThrowTypeError(env, "cpus must be an array of CPU numbers");
    double cpu = v.As<Napi::Number>().DoubleValue();
    if (!(cpu >= 0 && cpu < CPU_SETSIZE) || cpu != static_cast<int>(cpu)) ThrowOutOfRangeError(env, "CPU numbers must be integers 0.." + std::to_string(CPU_SETSIZE - 1));
    CPU_SET(static_cast<int>(cpu), &set);
  }
  int err = pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
  if (err != 0) ThrowSyscallError(env, err, "pthread_setaffinity_np");
  return env.Undefined();
}

// setThreadBatch(batch): the calling thread's policy SCHED_BATCH (true) or SCHED_OTHER (false),
// at nice level unchanged. A SCHED_BATCH thread that wakes does not preempt the thread running on
// its CPU (the kernel's wakeup preemption is for SCHED_OTHER only): it runs once that one blocks
// or its slice ends.
Napi::Value SetThreadBatch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsBoolean()) ThrowTypeError(env, "batch must be a boolean");
  struct sched_param param = {};
  // On Linux, pid 0 is the calling thread, not the whole process.
  if (sched_setscheduler(0, info[0].As<Napi::Boolean>().Value() ? SCHED_BATCH : SCHED_OTHER, &param) < 0) {
    ThrowSyscallError(env, errno, "sched_setscheduler");
  }
  return env.Undefined();
}

}  // namespace nodekvm
