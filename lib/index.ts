// node-kvm: drive Linux KVM from Node.js.
export * from './kvm/index.js';
