// Module entry: registers the bindings. The addon is context-aware (NODE_API_MODULE with
// per-environment state only), so it loads in every worker thread.
#include <errno.h>
#include <string.h>

#include "checksum.h"
#include "errors.h"
#include "handles.h"
#include "ioctl.h"
#include "kvm.h"
#include "layout.h"
#include "memory.h"
#include "socket.h"
#include "fd-watch.h"
#include "tap.h"
#include "unmapper.h"
#include "userfaultfd.h"
#include "file.h"
#include "thread.h"
#include "vcpu.h"
#include "vcpu-state.h"
#include "vm-state.h"
#include "vm.h"

namespace nodekvm {

namespace {

struct EnvData {
  Napi::FunctionReference errorClass;
};

EnvData* GetEnvData(Napi::Env env) { return env.GetInstanceData<EnvData>(); }

Napi::Error MakeKvmError(Napi::Env env, const std::string& code, int negErrno, const std::string& syscall,
                         const std::string& message) {
  EnvData* data = GetEnvData(env);
  if (data != nullptr && !data->errorClass.IsEmpty()) {
    Napi::Value error = data->errorClass.New({Napi::String::New(env, code), Napi::Number::New(env, negErrno),
                                              Napi::String::New(env, syscall), Napi::String::New(env, message)});
    return Napi::Error(env, error);
  }
  Napi::Error error = Napi::Error::New(env, message);
  error.Set("code", Napi::String::New(env, code));
  error.Set("errno", Napi::Number::New(env, negErrno));
  error.Set("syscall", Napi::String::New(env, syscall));
  return error;
}

Napi::Value SetErrorClass(const Napi::CallbackInfo& info) {
  if (!info[0].IsFunction()) ThrowTypeError(info.Env(), "error class must be a function");
  GetEnvData(info.Env())->errorClass = Napi::Persistent(info[0].As<Napi::Function>());
  return info.Env().Undefined();
}

Napi::Value HandleCount(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(Handles::Count()));
}

Napi::Value Ioctls(const Napi::CallbackInfo& info) { return IoctlOps(info.Env()); }

}  // namespace

void ThrowSyscallError(Napi::Env env, int err, const std::string& syscall) {
  const char* name = strerrorname_np(err);
  std::string code = name != nullptr ? name : "E" + std::to_string(err);
  std::string message = syscall + " failed: " + code + " (" + strerror(err) + ")";
  throw MakeKvmError(env, code, -err, syscall, message);
}

void ThrowStateError(Napi::Env env, const std::string& code, const std::string& message) {
  throw MakeKvmError(env, code, code == "EBADF" ? -EBADF : 0, "", message);
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* data = new EnvData();
  env.SetInstanceData(data);
  // A worker thread that exits without closing its handles must not leave vCPUs that a kick
  // would signal after the thread is gone, nor guest RAM that nothing can close any more.
  napi_add_env_cleanup_hook(env, [](void* arg) {
    Handles::CloseOwnedBy(static_cast<napi_env>(arg));
    ReleaseMemoryOwnedBy(static_cast<napi_env>(arg));
  }, env);

  auto fn = [&](const char* name, Napi::Value (*f)(const Napi::CallbackInfo&)) {
    exports.Set(name, Napi::Function::New(env, f, name));
  };
  fn("setErrorClass", SetErrorClass);
  fn("ioctlOps", Ioctls);
  fn("ioctl", Ioctl);
  fn("openSystem", OpenSystem);
  fn("closeSystem", CloseSystemHandle);
  fn("createVm", CreateVm);
  fn("vmFromFd", VmFromFd);
  fn("setUserMemoryRegion", SetUserMemoryRegion);
  fn("getDirtyLog", GetDirtyLog);
  fn("clearDirtyLog", ClearDirtyLog);
  fn("closeVm", CloseVmHandle);
  fn("closeVmAsync", CloseVmHandleAsync);
  fn("createEventFd", CreateEventFd);
  fn("createVcpu", CreateVcpu);
  fn("releaseVcpu", ReleaseVcpu);
  fn("adoptVcpu", AdoptVcpu);
  fn("closeReleasedVcpu", CloseReleasedVcpu);
  fn("run", Run);
  fn("kick", Kick);
  fn("kickSignal", KickSignal);
  fn("harvestDirtyRing", HarvestDirtyRing);
  fn("closeVcpu", CloseVcpuHandle);
  fn("saveVcpuState", SaveVcpuState);
  fn("saveParkedVcpuState", SaveParkedVcpuState);
  fn("checkVcpuState", CheckVcpuState);
  fn("restoreVcpuState", RestoreVcpuState);
  fn("restoreParkedVcpuState", RestoreParkedVcpuState);
  fn("saveVmState", SaveVmState);
  fn("checkVmState", CheckVmState);
  fn("restoreVmState", RestoreVmState);
  fn("memoryCreate", MemoryCreate);
  fn("memoryMapFile", MemoryMapFile);
  fn("memoryAttach", MemoryAttach);
  fn("memoryRelease", MemoryRelease);
  fn("memoryRetain", MemoryRetain);
  fn("memoryWrite", MemoryWrite);
  fn("memoryFill", MemoryFill);
  fn("memoryPopulatedRanges", MemoryPopulatedRanges);
  fn("memoryDontneed", MemoryDontneed);
  fn("memoryDontneedAsync", MemoryDontneedAsync);
  fn("memoryPopulate", MemoryPopulate);
  fn("setSocketBuffers", SetSocketBuffers);
  fn("dupSocket", DupSocket);
  fn("spinRead", SpinRead);
  fn("keepFromChildren", KeepFromChildren);
  fn("sendWithFds", SendWithFds);
  fn("receiveWithFds", ReceiveWithFds);
  fn("fileDup", FileDup);
  fn("memoryShareFd", MemoryShareFd);
  fn("memoryFromFd", MemoryFromFd);
  fn("memoryReplace", MemoryReplace);
  fn("memoryMapFileOver", MemoryMapFileOver);
  fn("tapOpen", TapOpen);
  fn("tapAdopt", TapAdopt);
  fn("fileDeallocate", FileDeallocate);
  fn("fileLock", FileLock);
  fn("fileDataRanges", FileDataRanges);
  fn("fileIdentity", FileIdentity);
  fn("memoryInfo", MemoryInfo);
  fn("memoryUnmapsSettled", MemoryUnmapsSettled);
  fn("detachBuffer", DetachBuffer);
  fn("handleCount", HandleCount);
  fn("layout", Layout);
  fn("setThreadName", SetThreadName);
  fn("setThreadAffinity", SetThreadAffinity);
  fn("setThreadBatch", SetThreadBatch);
  fn("watchFd", WatchFd);
  fn("crc32c", Crc32c);
  fn("encodePagesSection", EncodePagesSection);
  fn("encodeLivePagesSection", EncodeLivePagesSection);
  fn("uffdOpen", UffdOpen);
  fn("uffdReadFaults", UffdReadFaults);
  fn("uffdCopy", UffdCopy);
  fn("uffdZero", UffdZero);
  fn("uffdWake", UffdWake);
  fn("uffdClose", UffdClose);
  return exports;
}

NODE_API_MODULE(node_kvm, Init)

}  // namespace nodekvm
