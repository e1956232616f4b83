#include "machine/auto_converge.h"

#include <algorithm>

namespace keel::machine {

AutoConvergeState next_auto_converge(const AutoConvergeState& state, uint64_t dirtied_bytes,
                                     uint64_t sent_bytes, const AutoConvergePolicy& policy) {
  AutoConvergeState next = state;
  // Compared as dirtied * 100 > sent * share without overflow for any
  // realistic round (both well under 2^56 bytes).
  const unsigned __int128 dirtied = static_cast<unsigned __int128>(dirtied_bytes) * 100;
  const unsigned __int128 threshold =
      static_cast<unsigned __int128>(sent_bytes) * policy.dirty_share_percent;
  if (dirtied <= threshold) return next;
  if (next.high_rounds < policy.high_rounds_to_start) ++next.high_rounds;
  if (next.high_rounds < policy.high_rounds_to_start) return next;
  const uint32_t raised = next.throttle_percent == 0 ? policy.initial_percent
                                                      : next.throttle_percent + policy.step_percent;
  next.throttle_percent = std::min(raised, policy.max_percent);
  return next;
}

}  // namespace keel::machine
