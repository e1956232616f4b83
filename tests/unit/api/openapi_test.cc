// docs/api/openapi.json against the server's route table (api::routes(),
// the one list the router serves): a served route that is undocumented, or
// a documented one that is not served, fails here.
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <utility>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "api/routes.h"

namespace keel::api {
namespace {

using RouteKey = std::pair<std::string, std::string>;  // method, path

nlohmann::json load_document() {
  std::ifstream file(KEEL_OPENAPI_JSON);
  std::stringstream text;
  text << file.rdbuf();
  return nlohmann::json::parse(text.str(), nullptr, false);
}

std::string upper(std::string text) {
  for (char& c : text) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return text;
}

// The document's operation for a route (null if it is not documented).
nlohmann::json operation_of(const nlohmann::json& document, const Route& route) {
  std::string method(route.method);
  for (char& c : method) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  nlohmann::json::json_pointer pointer =
      nlohmann::json::json_pointer("/paths") / std::string(route.path) / method;
  return document.contains(pointer) ? document.at(pointer) : nlohmann::json();
}

TEST(OpenApiTest, DocumentIsOpenApi3) {
  nlohmann::json document = load_document();
  ASSERT_FALSE(document.is_discarded()) << KEEL_OPENAPI_JSON << " is not valid JSON";
  ASSERT_TRUE(document.contains("openapi"));
  EXPECT_EQ(document["openapi"].get<std::string>().substr(0, 2), "3.");
  ASSERT_TRUE(document.contains("paths"));
}

TEST(OpenApiTest, DocumentedRoutesAreExactlyTheServedOnes) {
  nlohmann::json document = load_document();
  ASSERT_FALSE(document.is_discarded());
  std::set<RouteKey> documented;
  static const std::set<std::string> kMethods = {"get", "put", "post", "delete", "patch", "head",
                                                 "options"};
  for (const auto& [path, item] : document["paths"].items()) {
    for (const auto& [method, operation] : item.items()) {
      if (kMethods.contains(method)) documented.emplace(upper(method), path);
    }
  }
  std::set<RouteKey> served;
  for (const Route& route : routes()) served.emplace(route.method, route.path);
  for (const RouteKey& key : served) {
    EXPECT_TRUE(documented.contains(key))
        << key.first << " " << key.second << " is served but not in docs/api/openapi.json";
  }
  for (const RouteKey& key : documented) {
    EXPECT_TRUE(served.contains(key))
        << key.first << " " << key.second << " is documented but not served";
  }
}

TEST(OpenApiTest, QueryParametersMatchTheRouteTable) {
  nlohmann::json document = load_document();
  ASSERT_FALSE(document.is_discarded());
  for (const Route& route : routes()) {
    const nlohmann::json operation = operation_of(document, route);
    std::set<std::string> documented;
    for (const nlohmann::json& parameter : operation.value("parameters", nlohmann::json::array())) {
      if (parameter.value("in", "") == "query") documented.insert(parameter.value("name", ""));
    }
    std::set<std::string> served(route.query_parameters.begin(), route.query_parameters.end());
    EXPECT_EQ(documented, served) << route.method << " " << route.path;
    EXPECT_TRUE(operation.contains("responses")) << route.path;
  }
}

TEST(OpenApiTest, RequestBodyFieldsMatchTheRouteTable) {
  nlohmann::json document = load_document();
  ASSERT_FALSE(document.is_discarded());
  for (const Route& route : routes()) {
    const nlohmann::json operation = operation_of(document, route);
    std::set<std::string> documented;
    if (operation.contains("requestBody")) {
      const nlohmann::json& schema =
          operation["requestBody"]["content"]["application/json"]["schema"];
      // items() refers to its object: keep it alive for the loop.
      const nlohmann::json properties = schema.value("properties", nlohmann::json::object());
      for (const auto& [name, property] : properties.items()) documented.insert(name);
    }
    std::set<std::string> served(route.body_fields.begin(), route.body_fields.end());
    EXPECT_EQ(documented, served) << route.method << " " << route.path;
  }
}

}  // namespace
}  // namespace keel::api
