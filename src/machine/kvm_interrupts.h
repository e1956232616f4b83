// The InterruptFabric on KVM: MSI vectors are GSIs with MSI routes
// (KVM_SET_GSI_ROUTING) fired through irqfds (KVM_IRQFD); doorbells are
// ioeventfds (KVM_IOEVENTFD). Spec: KVM API documentation, sections
// KVM_SET_GSI_ROUTING ("replaces any previously set routing"), KVM_IRQFD,
// KVM_IOEVENTFD.
// Because a routing update replaces the whole table, this class keeps the
// complete table: the in-kernel irqchip's pins (the routing KVM installs
// with KVM_CREATE_IRQCHIP: GSIs 0-15 on the PIC and the IOAPIC, 16-23 on
// the IOAPIC) plus one MSI route per vector.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>

#include "devices/interrupt_fabric.h"
#include "kvm/kvm.h"

namespace keel::machine {

class KvmInterruptFabric : public devices::InterruptFabric {
 public:
  // vm outlives the fabric and every vector it hands out.
  explicit KvmInterruptFabric(kvm::Vm& vm) : vm_(vm) {}

  Result<std::unique_ptr<devices::MsiVector>> allocate_msi() override;
  Result<void> add_mmio_doorbell(const EventFd& event, uint64_t address, uint32_t length) override;
  Result<void> remove_mmio_doorbell(const EventFd& event, uint64_t address,
                                    uint32_t length) override;

  // The first GSI after the irqchip's pins; vectors are numbered from here.
  static constexpr uint32_t kFirstMsiGsi = 24;

 private:
  class Vector;
  Result<void> set_route(uint32_t gsi, const devices::MsiMessage& message);
  void release(uint32_t gsi);
  Result<void> commit_locked();

  kvm::Vm& vm_;
  std::mutex mutex_;  // guards the members below
  std::map<uint32_t, std::optional<devices::MsiMessage>> msi_routes_;  // by GSI
  uint32_t next_gsi_ = kFirstMsiGsi;
};

}  // namespace keel::machine
