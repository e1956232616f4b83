// Auto-converge: how hard a live migration throttles the guest's vCPUs when
// the guest dirties RAM faster than the link carries it (QEMU's policy,
// migration/ram.c: migration_trigger_throttle and mig_throttle_guest_down).
// A pure function of each round's figures, so it is tested without a VM;
// Machine::set_throttle applies what it decides.
#pragma once

#include <cstdint>

namespace keel::machine {

struct AutoConvergePolicy {
  // A round is "high" when the bytes the guest dirtied during it exceed
  // this share of the bytes the round put on the wire.
  uint32_t dirty_share_percent = 50;
  uint32_t high_rounds_to_start = 2;  // high rounds before the first throttle
  uint32_t initial_percent = 20;
  uint32_t step_percent = 10;
  uint32_t max_percent = 99;
};

struct AutoConvergeState {
  uint32_t high_rounds = 0;       // rounds so far where dirtying outpaced the link
  uint32_t throttle_percent = 0;  // what the vCPUs are throttled to now, 0 to 99
};

// The state after a round that sent sent_bytes on the wire while the guest
// dirtied dirtied_bytes. Once high_rounds_to_start high rounds have been
// seen, each high round throttles: initial_percent the first time, then
// step_percent more, up to max_percent. (QEMU raises on every second high
// round; one per high round converges sooner, which a downtime limit
// measured in rounds of seconds wants.) A round that is not high leaves the
// throttle as it is: lifting it would let the guest run away again.
AutoConvergeState next_auto_converge(const AutoConvergeState& state, uint64_t dirtied_bytes,
                                     uint64_t sent_bytes,
                                     const AutoConvergePolicy& policy = {});

}  // namespace keel::machine
