#include "layout.h"

#include <linux/kvm.h>
#include <stddef.h>

namespace nodekvm {

Napi::Value Layout(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object sizes = Napi::Object::New(env);
  Napi::Object offsets = Napi::Object::New(env);
  Napi::Object constants = Napi::Object::New(env);
#define SIZE(s) sizes.Set(#s, Napi::Number::New(env, sizeof(struct s)))
#define OFF(s, f) offsets.Set(#s "." #f, Napi::Number::New(env, offsetof(struct s, f)))
#define CONST(c) constants.Set(#c, Napi::Number::New(env, static_cast<double>(c)))

  SIZE(kvm_regs);
  OFF(kvm_regs, rax); OFF(kvm_regs, rbx); OFF(kvm_regs, rcx); OFF(kvm_regs, rdx);
  OFF(kvm_regs, rsi); OFF(kvm_regs, rdi); OFF(kvm_regs, rsp); OFF(kvm_regs, rbp);
  OFF(kvm_regs, r8); OFF(kvm_regs, r9); OFF(kvm_regs, r10); OFF(kvm_regs, r11);
  OFF(kvm_regs, r12); OFF(kvm_regs, r13); OFF(kvm_regs, r14); OFF(kvm_regs, r15);
  OFF(kvm_regs, rip); OFF(kvm_regs, rflags);

  SIZE(kvm_segment);
  OFF(kvm_segment, base); OFF(kvm_segment, limit); OFF(kvm_segment, selector); OFF(kvm_segment, type);
  OFF(kvm_segment, present); OFF(kvm_segment, dpl); OFF(kvm_segment, db); OFF(kvm_segment, s);
  OFF(kvm_segment, l); OFF(kvm_segment, g); OFF(kvm_segment, avl); OFF(kvm_segment, unusable);
  SIZE(kvm_dtable);
  OFF(kvm_dtable, base); OFF(kvm_dtable, limit);

  SIZE(kvm_sregs);
  OFF(kvm_sregs, cs); OFF(kvm_sregs, ds); OFF(kvm_sregs, es); OFF(kvm_sregs, fs); OFF(kvm_sregs, gs);
  OFF(kvm_sregs, ss); OFF(kvm_sregs, tr); OFF(kvm_sregs, ldt); OFF(kvm_sregs, gdt); OFF(kvm_sregs, idt);
  OFF(kvm_sregs, cr0); OFF(kvm_sregs, cr2); OFF(kvm_sregs, cr3); OFF(kvm_sregs, cr4); OFF(kvm_sregs, cr8);
  OFF(kvm_sregs, efer); OFF(kvm_sregs, apic_base); OFF(kvm_sregs, interrupt_bitmap);

  SIZE(kvm_fpu);
  OFF(kvm_fpu, fpr); OFF(kvm_fpu, fcw); OFF(kvm_fpu, fsw); OFF(kvm_fpu, ftwx); OFF(kvm_fpu, last_opcode);
  OFF(kvm_fpu, last_ip); OFF(kvm_fpu, last_dp); OFF(kvm_fpu, xmm); OFF(kvm_fpu, mxcsr);

  SIZE(kvm_msr_entry);
  OFF(kvm_msr_entry, index); OFF(kvm_msr_entry, data);
  SIZE(kvm_msrs);
  OFF(kvm_msrs, nmsrs); OFF(kvm_msrs, entries);
  SIZE(kvm_msr_list);
  OFF(kvm_msr_list, nmsrs); OFF(kvm_msr_list, indices);

  SIZE(kvm_cpuid_entry2);
  OFF(kvm_cpuid_entry2, function); OFF(kvm_cpuid_entry2, index); OFF(kvm_cpuid_entry2, flags);
  OFF(kvm_cpuid_entry2, eax); OFF(kvm_cpuid_entry2, ebx); OFF(kvm_cpuid_entry2, ecx); OFF(kvm_cpuid_entry2, edx);
  SIZE(kvm_cpuid2);
  OFF(kvm_cpuid2, nent); OFF(kvm_cpuid2, entries);

  SIZE(kvm_lapic_state);
  OFF(kvm_lapic_state, regs);
  SIZE(kvm_xsave);
  OFF(kvm_xsave, region);
  SIZE(kvm_xcr);
  OFF(kvm_xcr, xcr); OFF(kvm_xcr, value);
  SIZE(kvm_xcrs);
  OFF(kvm_xcrs, nr_xcrs); OFF(kvm_xcrs, flags); OFF(kvm_xcrs, xcrs);

  SIZE(kvm_vcpu_events);
  OFF(kvm_vcpu_events, exception); OFF(kvm_vcpu_events, interrupt); OFF(kvm_vcpu_events, nmi);
  OFF(kvm_vcpu_events, sipi_vector); OFF(kvm_vcpu_events, flags); OFF(kvm_vcpu_events, smi);
  OFF(kvm_vcpu_events, triple_fault); OFF(kvm_vcpu_events, exception_has_payload);
  OFF(kvm_vcpu_events, exception_payload);

  SIZE(kvm_mp_state);
  OFF(kvm_mp_state, mp_state);
  SIZE(kvm_debugregs);
  OFF(kvm_debugregs, db); OFF(kvm_debugregs, dr6); OFF(kvm_debugregs, dr7); OFF(kvm_debugregs, flags);
  SIZE(kvm_guest_debug);
  OFF(kvm_guest_debug, control); OFF(kvm_guest_debug, arch);
  SIZE(kvm_translation);
  OFF(kvm_translation, linear_address); OFF(kvm_translation, physical_address); OFF(kvm_translation, valid);
  OFF(kvm_translation, writeable); OFF(kvm_translation, usermode);
  SIZE(kvm_interrupt);
  OFF(kvm_interrupt, irq);

  SIZE(kvm_pit_config);
  OFF(kvm_pit_config, flags);
  SIZE(kvm_pit_channel_state);
  OFF(kvm_pit_channel_state, count); OFF(kvm_pit_channel_state, latched_count);
  OFF(kvm_pit_channel_state, count_latched); OFF(kvm_pit_channel_state, status_latched);
  OFF(kvm_pit_channel_state, status); OFF(kvm_pit_channel_state, read_state);
  OFF(kvm_pit_channel_state, write_state); OFF(kvm_pit_channel_state, write_latch);
  OFF(kvm_pit_channel_state, rw_mode); OFF(kvm_pit_channel_state, mode); OFF(kvm_pit_channel_state, bcd);
  OFF(kvm_pit_channel_state, gate); OFF(kvm_pit_channel_state, count_load_time);
  SIZE(kvm_pit_state2);
  OFF(kvm_pit_state2, channels); OFF(kvm_pit_state2, flags);
  SIZE(kvm_irqchip);
  OFF(kvm_irqchip, chip_id); OFF(kvm_irqchip, chip);
  SIZE(kvm_irq_level);
  OFF(kvm_irq_level, irq); OFF(kvm_irq_level, level);
  SIZE(kvm_msi);
  OFF(kvm_msi, address_lo); OFF(kvm_msi, address_hi); OFF(kvm_msi, data); OFF(kvm_msi, flags); OFF(kvm_msi, devid);
  SIZE(kvm_irq_routing_entry);
  OFF(kvm_irq_routing_entry, gsi); OFF(kvm_irq_routing_entry, type); OFF(kvm_irq_routing_entry, flags);
  OFF(kvm_irq_routing_entry, u);
  SIZE(kvm_irq_routing);
  OFF(kvm_irq_routing, nr); OFF(kvm_irq_routing, entries);
  SIZE(kvm_irqfd);
  OFF(kvm_irqfd, fd); OFF(kvm_irqfd, gsi); OFF(kvm_irqfd, flags); OFF(kvm_irqfd, resamplefd);
  SIZE(kvm_ioeventfd);
  OFF(kvm_ioeventfd, datamatch); OFF(kvm_ioeventfd, addr); OFF(kvm_ioeventfd, len); OFF(kvm_ioeventfd, fd);
  OFF(kvm_ioeventfd, flags);
  SIZE(kvm_clock_data);
  OFF(kvm_clock_data, clock); OFF(kvm_clock_data, flags); OFF(kvm_clock_data, realtime); OFF(kvm_clock_data, host_tsc);
  SIZE(kvm_enable_cap);
  OFF(kvm_enable_cap, cap); OFF(kvm_enable_cap, flags); OFF(kvm_enable_cap, args);
  SIZE(kvm_nested_state);
  OFF(kvm_nested_state, flags); OFF(kvm_nested_state, format); OFF(kvm_nested_state, size);
  SIZE(kvm_dirty_gfn);
  OFF(kvm_dirty_gfn, flags); OFF(kvm_dirty_gfn, slot); OFF(kvm_dirty_gfn, offset);

  SIZE(kvm_run);
  OFF(kvm_run, request_interrupt_window); OFF(kvm_run, immediate_exit); OFF(kvm_run, exit_reason);
  OFF(kvm_run, ready_for_interrupt_injection); OFF(kvm_run, if_flag); OFF(kvm_run, flags);
  OFF(kvm_run, cr8); OFF(kvm_run, apic_base);
  OFF(kvm_run, io.direction); OFF(kvm_run, io.size); OFF(kvm_run, io.port); OFF(kvm_run, io.count);
  OFF(kvm_run, io.data_offset);
  OFF(kvm_run, mmio.phys_addr); OFF(kvm_run, mmio.data); OFF(kvm_run, mmio.len); OFF(kvm_run, mmio.is_write);
  OFF(kvm_run, hw.hardware_exit_reason);
  OFF(kvm_run, fail_entry.hardware_entry_failure_reason); OFF(kvm_run, fail_entry.cpu);
  OFF(kvm_run, ex.exception); OFF(kvm_run, ex.error_code);
  OFF(kvm_run, debug.arch.exception); OFF(kvm_run, debug.arch.pc); OFF(kvm_run, debug.arch.dr6);
  OFF(kvm_run, debug.arch.dr7);
  OFF(kvm_run, internal.suberror); OFF(kvm_run, internal.ndata); OFF(kvm_run, internal.data);
  OFF(kvm_run, system_event.type); OFF(kvm_run, system_event.ndata); OFF(kvm_run, system_event.data);
  OFF(kvm_run, msr.error); OFF(kvm_run, msr.reason); OFF(kvm_run, msr.index); OFF(kvm_run, msr.data);
  OFF(kvm_run, hypercall.nr); OFF(kvm_run, hypercall.args); OFF(kvm_run, hypercall.ret);
  OFF(kvm_run, tpr_access.rip); OFF(kvm_run, tpr_access.is_write);
  OFF(kvm_run, eoi.vector);
  OFF(kvm_run, notify.flags);

  // Constants the TypeScript layer mirrors.
  CONST(KVM_API_VERSION);
  CONST(KVM_EXIT_UNKNOWN); CONST(KVM_EXIT_EXCEPTION); CONST(KVM_EXIT_IO); CONST(KVM_EXIT_HYPERCALL);
  CONST(KVM_EXIT_DEBUG); CONST(KVM_EXIT_HLT); CONST(KVM_EXIT_MMIO); CONST(KVM_EXIT_IRQ_WINDOW_OPEN);
  CONST(KVM_EXIT_SHUTDOWN); CONST(KVM_EXIT_FAIL_ENTRY); CONST(KVM_EXIT_INTR); CONST(KVM_EXIT_SET_TPR);
  CONST(KVM_EXIT_TPR_ACCESS); CONST(KVM_EXIT_NMI); CONST(KVM_EXIT_INTERNAL_ERROR);
  CONST(KVM_EXIT_SYSTEM_EVENT); CONST(KVM_EXIT_IOAPIC_EOI); CONST(KVM_EXIT_HYPERV);
  CONST(KVM_EXIT_X86_RDMSR); CONST(KVM_EXIT_X86_WRMSR); CONST(KVM_EXIT_DIRTY_RING_FULL);
  CONST(KVM_EXIT_AP_RESET_HOLD); CONST(KVM_EXIT_X86_BUS_LOCK); CONST(KVM_EXIT_NOTIFY);
  CONST(KVM_EXIT_IO_IN); CONST(KVM_EXIT_IO_OUT);
  CONST(KVM_MEM_LOG_DIRTY_PAGES); CONST(KVM_MEM_READONLY);
  CONST(KVM_CAP_IRQCHIP); CONST(KVM_CAP_HLT); CONST(KVM_CAP_USER_MEMORY); CONST(KVM_CAP_SET_TSS_ADDR);
  CONST(KVM_CAP_EXT_CPUID); CONST(KVM_CAP_NR_VCPUS); CONST(KVM_CAP_NR_MEMSLOTS); CONST(KVM_CAP_PIT);
  CONST(KVM_CAP_MP_STATE); CONST(KVM_CAP_IRQ_ROUTING); CONST(KVM_CAP_IRQFD); CONST(KVM_CAP_PIT2);
  CONST(KVM_CAP_SET_IDENTITY_MAP_ADDR); CONST(KVM_CAP_ADJUST_CLOCK); CONST(KVM_CAP_VCPU_EVENTS);
  CONST(KVM_CAP_IOEVENTFD); CONST(KVM_CAP_SET_GUEST_DEBUG); CONST(KVM_CAP_DEBUGREGS); CONST(KVM_CAP_XSAVE);
  CONST(KVM_CAP_XCRS); CONST(KVM_CAP_TSC_CONTROL); CONST(KVM_CAP_GET_TSC_KHZ); CONST(KVM_CAP_MAX_VCPUS);
  CONST(KVM_CAP_SIGNAL_MSI); CONST(KVM_CAP_READONLY_MEM); CONST(KVM_CAP_KVMCLOCK_CTRL);
  CONST(KVM_CAP_IRQFD_RESAMPLE); CONST(KVM_CAP_IMMEDIATE_EXIT); CONST(KVM_CAP_GET_MSR_FEATURES);
  CONST(KVM_CAP_NESTED_STATE); CONST(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2); CONST(KVM_CAP_DIRTY_LOG_RING);
  CONST(KVM_CAP_DIRTY_LOG_RING_ACQ_REL); CONST(KVM_CAP_XSAVE2); CONST(KVM_CAP_SYNC_REGS);
  CONST(KVM_CAP_X86_USER_SPACE_MSR); CONST(KVM_CAP_SPLIT_IRQCHIP); CONST(KVM_CAP_X86_DISABLE_EXITS);
  CONST(KVM_CAP_COALESCED_MMIO); CONST(KVM_CAP_COALESCED_PIO); CONST(KVM_CAP_MULTI_ADDRESS_SPACE);
  CONST(KVM_CAP_EXIT_ON_EMULATION_FAILURE); CONST(KVM_CAP_MAX_VCPU_ID); CONST(KVM_CAP_TSC_DEADLINE_TIMER);
  CONST(KVM_CAP_X2APIC_API); CONST(KVM_CAP_HYPERV_ENLIGHTENED_VMCS);
  CONST(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE); CONST(KVM_DIRTY_LOG_INITIALLY_SET);
  CONST(KVM_DIRTY_LOG_PAGE_OFFSET); CONST(KVM_DIRTY_GFN_F_DIRTY); CONST(KVM_DIRTY_GFN_F_RESET);
  CONST(KVM_IRQCHIP_PIC_MASTER); CONST(KVM_IRQCHIP_PIC_SLAVE); CONST(KVM_IRQCHIP_IOAPIC);
  CONST(KVM_IRQ_ROUTING_IRQCHIP); CONST(KVM_IRQ_ROUTING_MSI);
  CONST(KVM_IRQFD_FLAG_DEASSIGN); CONST(KVM_IRQFD_FLAG_RESAMPLE);
  CONST(KVM_IOEVENTFD_FLAG_DATAMATCH); CONST(KVM_IOEVENTFD_FLAG_PIO); CONST(KVM_IOEVENTFD_FLAG_DEASSIGN);
  CONST(KVM_PIT_SPEAKER_DUMMY);
  CONST(KVM_MP_STATE_RUNNABLE); CONST(KVM_MP_STATE_UNINITIALIZED); CONST(KVM_MP_STATE_INIT_RECEIVED);
  CONST(KVM_MP_STATE_HALTED); CONST(KVM_MP_STATE_SIPI_RECEIVED);
  CONST(KVM_GUESTDBG_ENABLE); CONST(KVM_GUESTDBG_SINGLESTEP); CONST(KVM_GUESTDBG_USE_SW_BP);
  CONST(KVM_GUESTDBG_USE_HW_BP); CONST(KVM_GUESTDBG_INJECT_DB); CONST(KVM_GUESTDBG_INJECT_BP);
  CONST(KVM_SYSTEM_EVENT_SHUTDOWN); CONST(KVM_SYSTEM_EVENT_RESET); CONST(KVM_SYSTEM_EVENT_CRASH);
  CONST(KVM_INTERNAL_ERROR_EMULATION); CONST(KVM_INTERNAL_ERROR_SIMUL_EX); CONST(KVM_INTERNAL_ERROR_DELIVERY_EV);
  CONST(KVM_VCPUEVENT_VALID_NMI_PENDING); CONST(KVM_VCPUEVENT_VALID_SIPI_VECTOR);
  CONST(KVM_VCPUEVENT_VALID_SHADOW); CONST(KVM_VCPUEVENT_VALID_SMM); CONST(KVM_VCPUEVENT_VALID_PAYLOAD);
  CONST(KVM_VCPUEVENT_VALID_TRIPLE_FAULT);
  CONST(KVM_CLOCK_TSC_STABLE); CONST(KVM_CLOCK_REALTIME); CONST(KVM_CLOCK_HOST_TSC);
#undef SIZE
#undef OFF
#undef CONST

  Napi::Object result = Napi::Object::New(env);
  result.Set("sizes", sizes);
  result.Set("offsets", offsets);
  result.Set("constants", constants);
  return result;
}

}  // namespace nodekvm
