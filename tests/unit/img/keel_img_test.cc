// keel-img, run as a program: create, info and check, next to qemu-img where
// it is installed.
#include <cstring>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "../block/qcow2_support.h"
#include "block/image.h"

namespace keel::block {
namespace {

using testing::have_program;
using testing::output_of;
using testing::pattern;
using testing::run;
using testing::run_capturing;
using testing::TempDir;
using testing::write_be64;
using testing::write_bytes;
using testing::write_file;

const std::string kImg = KEEL_IMG_PATH;

// Runs keel-img once; returns its exit status and fills out with
// stdout+stderr of that same run.
int keel_img(const std::string& args, std::string* out = nullptr) {
  return run_capturing(kImg + " " + args, out);
}

TEST(KeelImgTest, HelpAndUsageErrors) {
  std::string out;
  EXPECT_EQ(keel_img("--help", &out), 0);
  EXPECT_NE(out.find("create"), std::string::npos);
  EXPECT_NE(out.find("check"), std::string::npos);
  EXPECT_EQ(keel_img("create --help", &out), 0);
  EXPECT_NE(out.find("cluster_size"), std::string::npos);
  EXPECT_NE(keel_img("", &out), 0);
  EXPECT_NE(keel_img("create -f vmdk x 1M", &out), 0);
}

TEST(KeelImgTest, ErrorsNameTheFileAndTheProblem) {
  TempDir dir;
  std::string out;
  EXPECT_EQ(keel_img("info " + dir.file("missing.qcow2"), &out), 1);
  EXPECT_NE(out.find("missing.qcow2"), std::string::npos) << out;
  EXPECT_EQ(keel_img("create " + dir.file("a.qcow2") + " 12Q", &out), 1);
  EXPECT_NE(out.find("a.qcow2"), std::string::npos) << out;
  EXPECT_NE(out.find("suffix"), std::string::npos) << out;
  EXPECT_EQ(keel_img("create -o cluster_size=3000 " + dir.file("a.qcow2") + " 1M", &out), 1);
  EXPECT_NE(out.find("power of two"), std::string::npos) << out;
  EXPECT_EQ(keel_img("create -b nothere.raw " + dir.file("a.qcow2"), &out), 1);
  EXPECT_NE(out.find("nothere.raw"), std::string::npos) << out;
  {
    auto junk = pattern(4096, 1);
    junk[0] = std::byte{'Q'};
    junk[1] = std::byte{'F'};
    junk[2] = std::byte{'I'};
    junk[3] = std::byte{0xfb};
    for (size_t i : {4, 5, 6, 20, 21, 22}) junk[i] = std::byte{0};
    junk[7] = std::byte{3};    // version 3
    junk[23] = std::byte{30};  // cluster_bits 30
    write_file(dir.file("junk.qcow2"), junk);
  }
  EXPECT_EQ(keel_img("info " + dir.file("junk.qcow2"), &out), 1);
  EXPECT_NE(out.find("junk.qcow2"), std::string::npos) << out;
  EXPECT_NE(out.find("Corrupt"), std::string::npos) << out;
  EXPECT_NE(out.find("cluster_bits 30"), std::string::npos) << out;
}

TEST(KeelImgTest, CreateAndInfo) {
  TempDir dir;
  write_file(dir.file("base.raw"), pattern(3 << 20, 1));
  std::string out;
  ASSERT_EQ(keel_img("create -f qcow2 -o cluster_size=4k,compat=0.10 " + dir.file("mid.qcow2") +
                         " 5M",
                     &out),
            0)
      << out;
  ASSERT_EQ(keel_img("create -b base.raw " + dir.file("top.qcow2"), &out), 0) << out;
  ASSERT_EQ(keel_img("info " + dir.file("top.qcow2"), &out), 0) << out;
  EXPECT_NE(out.find("file format: qcow2"), std::string::npos) << out;
  EXPECT_NE(out.find("(3145728 bytes)"), std::string::npos) << out;
  EXPECT_NE(out.find("backing file: base.raw (actual path: " + dir.file("base.raw") + ")"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("backing file format: raw"), std::string::npos) << out;
  EXPECT_NE(out.find("cluster_size: 65536"), std::string::npos) << out;

  ASSERT_EQ(keel_img("info --json --backing-chain " + dir.file("top.qcow2"), &out), 0) << out;
  auto chain = nlohmann::json::parse(out);
  ASSERT_EQ(chain.size(), 2u);
  EXPECT_EQ(chain[0]["format"], "qcow2");
  EXPECT_EQ(chain[0]["virtual-size"], 3u << 20);
  EXPECT_EQ(chain[0]["backing-filename-format"], "raw");
  EXPECT_EQ(chain[1]["format"], "raw");

  ASSERT_EQ(keel_img("info --json " + dir.file("mid.qcow2"), &out), 0) << out;
  auto mid = nlohmann::json::parse(out);
  EXPECT_EQ(mid["cluster-size"], 4096);
  EXPECT_EQ(mid["format-specific"]["data"]["compat"], "0.10");

  if (have_program("qemu-img")) {
    auto qemu = nlohmann::json::parse(output_of("qemu-img info --output=json " +
                                                dir.file("top.qcow2")));
    EXPECT_EQ(qemu["virtual-size"], chain[0]["virtual-size"]);
    EXPECT_EQ(qemu["backing-filename"], chain[0]["backing-filename"]);
    EXPECT_EQ(qemu["full-backing-filename"], chain[0]["full-backing-filename"]);
    EXPECT_EQ(qemu["cluster-size"], chain[0]["cluster-size"]);
    EXPECT_EQ(run("qemu-img check " + dir.file("mid.qcow2")), 0);
  }

  ASSERT_EQ(keel_img("create -f raw " + dir.file("r.raw") + " 1G", &out), 0) << out;
  ASSERT_EQ(keel_img("info " + dir.file("r.raw"), &out), 0) << out;
  EXPECT_NE(out.find("file format: raw"), std::string::npos) << out;
  EXPECT_NE(out.find("(1073741824 bytes)"), std::string::npos) << out;
}

TEST(KeelImgTest, CheckFindsLeaksAndCorruptionLikeQemuImg) {
  TempDir dir;
  const std::string image = dir.file("c.qcow2");
  std::string out;
  ASSERT_EQ(keel_img("create " + image + " 4M", &out), 0) << out;
  {
    auto disk = open_image(image, ImageFormat::Qcow2, Access::ReadWrite);
    ASSERT_TRUE(disk.has_value());
    ASSERT_TRUE(write_bytes(**disk, 0, pattern(3 * 65536, 2)).has_value());
  }
  const bool qemu = have_program("qemu-img");
  EXPECT_EQ(keel_img("check " + image, &out), 0) << out;
  EXPECT_NE(out.find("No errors"), std::string::npos) << out;
  if (qemu) {
    EXPECT_EQ(run("qemu-img check " + image), 0);
  }

  // Layout: header, refcount table, block, L1, then the L2 table at
  // 0x40000 and data from 0x50000. Dropping an L2 entry leaks its cluster.
  write_be64(image, 0x40000 + 8, 0);
  EXPECT_EQ(keel_img("check " + image, &out), 3) << out;
  EXPECT_NE(out.find("1 leaked clusters"), std::string::npos) << out;
  if (qemu) {
    EXPECT_EQ(run("qemu-img check " + image), 3);
  }

  // Pointing a second entry at a used cluster is corruption (refcount 1,
  // two references).
  write_be64(image, 0x40000 + 8, 0x50000 | (1ull << 63));
  EXPECT_EQ(keel_img("check " + image, &out), 2) << out;
  EXPECT_NE(out.find("ERROR"), std::string::npos) << out;
  if (qemu) {
    EXPECT_EQ(run("qemu-img check " + image), 2);
  }
}

}  // namespace
}  // namespace keel::block
