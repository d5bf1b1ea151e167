{
  "targets": [
    {
      "target_name": "node_kvm",
      "sources": [
        "native/addon.cc",
        "native/handles.cc",
        "native/ioctl.cc",
        "native/kvm.cc",
        "native/vm.cc",
        "native/vcpu.cc",
        "native/vcpu-state.cc",
        "native/vm-state.cc",
        "native/memory.cc",
        "native/layout.cc",
        "native/abi.c",
        "native/socket.cc",
        "native/file.cc",
        "native/thread.cc",
        "native/fd-watch.cc",
        "native/checksum.cc",
        "native/crc32c.cc",
        "native/tap.cc",
        "native/userfaultfd.cc",
        "native/unmapper.cc"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NODE_ADDON_API_DISABLE_DEPRECATED"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++17"],
      "cflags_cc": ["-std=c++17", "-fexceptions", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      "cflags": ["-fvisibility=hidden"]
    }
  ]
}
