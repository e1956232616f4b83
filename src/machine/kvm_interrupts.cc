#include "machine/kvm_interrupts.h"

#include <vector>

#include <fmt/format.h>

#include "base/log.h"

namespace keel::machine {

class KvmInterruptFabric::Vector : public devices::MsiVector {
 public:
  Vector(KvmInterruptFabric& fabric, uint32_t gsi, EventFd irqfd)
      : fabric_(fabric), gsi_(gsi), irqfd_(std::move(irqfd)) {}
  ~Vector() override {
    (void)fabric_.vm_.unregister_irqfd(irqfd_, gsi_);
    fabric_.release(gsi_);
  }
  Result<void> set_message(const devices::MsiMessage& message) override {
    return fabric_.set_route(gsi_, message);
  }
  void trigger() override {
    if (auto signalled = irqfd_.signal(); !signalled) {
      LOG_RATELIMITED(warn, "irqfd for GSI {}: {}", gsi_, signalled.error().message());
    }
  }

 private:
  KvmInterruptFabric& fabric_;
  uint32_t gsi_;
  EventFd irqfd_;
};

Result<std::unique_ptr<devices::MsiVector>> KvmInterruptFabric::allocate_msi() {
  uint32_t gsi = 0;
  {
    std::lock_guard lock(mutex_);
    gsi = next_gsi_++;
    msi_routes_[gsi] = std::nullopt;  // no route until the guest programs one
  }
  EventFd irqfd = TRY(EventFd::create());
  // An irqfd on a GSI without a route is accepted and delivers nothing;
  // KVM re-resolves it when the routing table changes.
  if (auto registered = vm_.register_irqfd(irqfd, gsi); !registered) {
    release(gsi);
    return fail(std::move(registered).error());
  }
  return std::unique_ptr<devices::MsiVector>(std::make_unique<Vector>(*this, gsi, std::move(irqfd)));
}

Result<void> KvmInterruptFabric::set_route(uint32_t gsi, const devices::MsiMessage& message) {
  std::lock_guard lock(mutex_);
  msi_routes_[gsi] = message;
  return commit_locked();
}

void KvmInterruptFabric::release(uint32_t gsi) {
  std::lock_guard lock(mutex_);
  auto it = msi_routes_.find(gsi);
  if (it == msi_routes_.end()) return;
  const bool routed = it->second.has_value();
  msi_routes_.erase(it);
  if (routed) {
    if (auto committed = commit_locked(); !committed) {
      LOG_RATELIMITED(warn, "dropping the route of GSI {}: {}", gsi, committed.error().message());
    }
  }
}

Result<void> KvmInterruptFabric::commit_locked() {
  std::vector<kvm::IrqRoute> routes;
  routes.reserve(40 + msi_routes_.size());
  for (uint32_t gsi = 0; gsi < kFirstMsiGsi; ++gsi) {
    if (gsi < 16) {
      routes.push_back(kvm::IrqRoute{.kind = kvm::IrqRoute::Kind::IrqchipPin,
                                     .gsi = gsi,
                                     .irqchip = gsi < 8 ? kvm::kIrqchipPicMaster
                                                        : kvm::kIrqchipPicSlave,
                                     .pin = gsi % 8});
    }
    routes.push_back(kvm::IrqRoute{.kind = kvm::IrqRoute::Kind::IrqchipPin,
                                   .gsi = gsi,
                                   .irqchip = kvm::kIrqchipIoapic,
                                   .pin = gsi});
  }
  for (const auto& [gsi, message] : msi_routes_) {
    if (!message) continue;
    routes.push_back(kvm::IrqRoute{.kind = kvm::IrqRoute::Kind::Msi,
                                   .gsi = gsi,
                                   .msi_address = message->address,
                                   .msi_data = message->data});
  }
  return vm_.set_gsi_routing(routes);
}

Result<void> KvmInterruptFabric::add_mmio_doorbell(const EventFd& event, uint64_t address,
                                                   uint32_t length) {
  return vm_.register_ioeventfd(event, address, length, kvm::IoSpace::Mmio);
}

Result<void> KvmInterruptFabric::remove_mmio_doorbell(const EventFd& event, uint64_t address,
                                                      uint32_t length) {
  return vm_.unregister_ioeventfd(event, address, length, kvm::IoSpace::Mmio);
}

}  // namespace keel::machine
