// node-kvm: drive Linux KVM from Node.js.
export * from './kvm/index.js';
export * from './vmm/index.js';
export * from './boot/index.js';
export * from './migration/index.js';
export * from './debug/index.js';
