#include "api/event_log.h"

#include <gtest/gtest.h>

namespace keel::api {
namespace {

TEST(EventLogTest, NumbersEventsFromOne) {
  EventLog log;
  EXPECT_EQ(log.last_seq(), 0u);
  EXPECT_EQ(log.first_seq(), 1u);
  EXPECT_EQ(log.publish("created", {{"boot", 1}}), 1u);
  EXPECT_EQ(log.publish("running"), 2u);
  EventLog::Slice slice = log.after(0, 10);
  ASSERT_EQ(slice.events.size(), 2u);
  EXPECT_FALSE(slice.missed);
  EXPECT_EQ(slice.events[0].seq, 1u);
  EXPECT_EQ(slice.events[0].type, "created");
  EXPECT_EQ(slice.events[1].seq, 2u);
  nlohmann::ordered_json json = slice.events[0].to_json();
  EXPECT_EQ(json.begin().key(), "seq") << "seq leads each line";
  EXPECT_EQ(json["seq"], 1);
  EXPECT_EQ(json["type"], "created");
  EXPECT_EQ(json["boot"], 1);
  EXPECT_GT(json["timestamp_ms"].get<int64_t>(), 0);
}

TEST(EventLogTest, AfterReturnsOnlyLaterEventsUpToMax) {
  EventLog log;
  for (int i = 0; i < 10; ++i) log.publish("e");
  EventLog::Slice slice = log.after(4, 3);
  ASSERT_EQ(slice.events.size(), 3u);
  EXPECT_EQ(slice.events[0].seq, 5u);
  EXPECT_EQ(slice.events[2].seq, 7u);
  EXPECT_TRUE(log.after(10, 3).events.empty());
  EXPECT_TRUE(log.after(99, 3).events.empty());
}

TEST(EventLogTest, RingDropsTheOldestAndReportsMissed) {
  EventLog log(4);
  for (int i = 0; i < 10; ++i) log.publish("e");
  EXPECT_EQ(log.first_seq(), 7u);
  EXPECT_EQ(log.last_seq(), 10u);
  EventLog::Slice slice = log.after(2, 100);
  EXPECT_TRUE(slice.missed);
  ASSERT_EQ(slice.events.size(), 4u);
  EXPECT_EQ(slice.events[0].seq, 7u);
  // Exactly the last one dropped: a client that saw 6 missed nothing.
  slice = log.after(6, 100);
  EXPECT_FALSE(slice.missed);
  EXPECT_EQ(slice.events.size(), 4u);
  slice = log.after(5, 100);
  EXPECT_TRUE(slice.missed);
}

TEST(EventLogTest, ListenerRunsAfterEachPublish) {
  EventLog log;
  int calls = 0;
  log.set_listener([&] {
    ++calls;
    EXPECT_EQ(log.last_seq(), static_cast<uint64_t>(calls)) << "called outside the lock";
  });
  log.publish("a");
  log.publish("b");
  EXPECT_EQ(calls, 2);
  log.set_listener({});
  log.publish("c");
  EXPECT_EQ(calls, 2);
}

}  // namespace
}  // namespace keel::api
