#include "fd-watch.h"

#include <fcntl.h>
#include <uv.h>

#include "errors.h"

namespace nodekvm {

namespace {

// One watcher. Owned by libuv's handle until uv_close's callback; the JS side holds an external
// whose finalizer only detaches, so a collected handle never frees a watcher libuv still uses.
struct Watcher {
  uv_poll_t poll;
  napi_env env;
  Napi::FunctionReference callback;
  Napi::ObjectReference resource;
  bool closed = false;
};

void OnEnvCleanup(void* arg);

void CloseWatcher(Watcher* watcher) {
  if (watcher->closed) return;
  watcher->closed = true;
  napi_remove_env_cleanup_hook(watcher->env, OnEnvCleanup, watcher);
  // The references go now, while the environment surely lives; the memory once libuv lets go.
  watcher->callback.Reset();
  watcher->resource.Reset();
  uv_poll_stop(&watcher->poll);
  uv_close(reinterpret_cast<uv_handle_t*>(&watcher->poll), [](uv_handle_t* handle) {
    delete static_cast<Watcher*>(handle->data);
  });
}

void OnEnvCleanup(void* arg) { CloseWatcher(static_cast<Watcher*>(arg)); }

void OnReadable(uv_poll_t* handle, int status, int events) {
  auto* watcher = static_cast<Watcher*>(handle->data);
  if (watcher->closed) return;
  napi_env env = watcher->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  // Through napi_make_callback, so that promises the callback settles run before libuv goes on.
  napi_value resource = watcher->resource.Value();
  napi_value name;
  napi_async_context context;
  napi_value global;
  napi_value argument;
  if (napi_create_string_utf8(env, "node-kvm:fd-watch", NAPI_AUTO_LENGTH, &name) == napi_ok &&
      napi_async_init(env, resource, name, &context) == napi_ok) {
    napi_get_global(env, &global);
    napi_create_int32(env, status < 0 ? status : 0, &argument);
    napi_value result;
    if (napi_make_callback(env, context, global, watcher->callback.Value(), 1, &argument, &result) == napi_pending_exception) {
      // An exception in the callback is the thread's uncaught exception, as for any event. (A
      // thread being terminated has none to report: nothing is left pending then.)
      napi_value exception;
      napi_valuetype type;
      if (napi_get_and_clear_last_exception(env, &exception) == napi_ok && napi_typeof(env, exception, &type) == napi_ok &&
          type != napi_undefined) {
        napi_fatal_exception(env, exception);
      }
    }
    napi_async_destroy(env, context);
  }
  napi_close_handle_scope(env, scope);
}

Napi::Value CloseWatch(const Napi::CallbackInfo& info) {
  auto* slot = static_cast<Watcher**>(info.Data());
  if (*slot != nullptr) {
    CloseWatcher(*slot);
    *slot = nullptr;
  }
  return info.Env().Undefined();
}

}  // namespace

// watchFd(fd, onReadable): calls onReadable() on this thread's event loop each time fd is
// readable (level-triggered: until the caller has read what is there). Returns close().
Napi::Value WatchFd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber()) ThrowTypeError(env, "fd must be a file descriptor number");
  double fdValue = info[0].As<Napi::Number>().DoubleValue();
  if (!(fdValue >= 0 && fdValue <= 0x7fffffff) || fdValue != static_cast<int>(fdValue)) ThrowOutOfRangeError(env, "fd must be a file descriptor number");
  if (!info[1].IsFunction()) ThrowTypeError(env, "onReadable must be a function");
  int fd = static_cast<int>(fdValue);
  if (fcntl(fd, F_GETFD) < 0) ThrowSyscallError(env, errno, "fcntl");
  uv_loop_t* loop = nullptr;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok || loop == nullptr) ThrowStateError(env, "ERR_INVALID_STATE", "no event loop to watch on");

  auto* watcher = new Watcher();
  watcher->env = env;
  int err = uv_poll_init(loop, &watcher->poll, fd);
  if (err != 0) {
    delete watcher;
    ThrowSyscallError(env, -err, "uv_poll_init");
  }
  watcher->poll.data = watcher;
  watcher->callback = Napi::Persistent(info[1].As<Napi::Function>());
  watcher->resource = Napi::Persistent(Napi::Object::New(env));
  err = uv_poll_start(&watcher->poll, UV_READABLE, OnReadable);
  if (err != 0) {
    watcher->closed = true;
    uv_close(reinterpret_cast<uv_handle_t*>(&watcher->poll), [](uv_handle_t* handle) { delete static_cast<Watcher*>(handle->data); });
    ThrowSyscallError(env, -err, "uv_poll_start");
  }
  napi_add_env_cleanup_hook(env, OnEnvCleanup, watcher);

  // close() reaches the watcher through a slot it clears, so a second call does nothing.
  auto* slot = new Watcher*(watcher);
  Napi::Function close = Napi::Function::New(env, CloseWatch, "close", slot);
  close.AddFinalizer([](Napi::Env, Watcher** s) { delete s; }, slot);
  return close;
}

}  // namespace nodekvm
