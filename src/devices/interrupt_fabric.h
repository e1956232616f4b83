// InterruptFabric: what a PCI device needs from the VM to interrupt the
// guest and to be notified by it without a userspace exit on the vCPU
// thread. The machine implements it on KVM (GSI routing + irqfd for MSI,
// ioeventfd for doorbells); tests use a fake that records calls.
#pragma once

#include <cstdint>
#include <memory>

#include "base/event_fd.h"
#include "base/result.h"

namespace keel::devices {

// An MSI as the guest programmed it (PCI 3.0 §6.8.1.3-4; on x86 the address
// selects the LAPIC(s), the data the vector and delivery mode).
struct MsiMessage {
  uint64_t address = 0;
  uint32_t data = 0;
  bool operator==(const MsiMessage&) const = default;
};

// One interrupt source a device can fire; released when destroyed.
class MsiVector {
 public:
  virtual ~MsiVector() = default;
  // Points the vector at message (vCPU threads, during table writes).
  virtual Result<void> set_message(const MsiMessage& message) = 0;
  // Delivers the last message set. Any thread; an eventfd write.
  virtual void trigger() = 0;
};

class InterruptFabric {
 public:
  virtual ~InterruptFabric() = default;
  virtual Result<std::unique_ptr<MsiVector>> allocate_msi() = 0;
  // Makes a guest write of length bytes (1, 2, 4 or 8) to the MMIO address
  // signal event instead of exiting to userspace.
  virtual Result<void> add_mmio_doorbell(const EventFd& event, uint64_t address,
                                         uint32_t length) = 0;
  virtual Result<void> remove_mmio_doorbell(const EventFd& event, uint64_t address,
                                            uint32_t length) = 0;
};

}  // namespace keel::devices
