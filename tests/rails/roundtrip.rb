# Rails' side of the round trip (tests/rails.rs): a minimal Rails 6.1 application with
# Active Storage on two S3 services. `legacy` is bucket ARGV[1], `production` bucket
# ARGV[2]; every blob is uploaded through Active Storage to `legacy`, then, once
# relocator moved them, read back through Active Storage from whatever service each blob
# names now.
#
#   ruby roundtrip.rb upload LEGACY_BUCKET PRODUCTION_BUCKET   Rails' own migration, uploads
#   ruby roundtrip.rb check  LEGACY_BUCKET PRODUCTION_BUCKET   prints one JSON line
#
# Settings from the environment: DATABASE_URL, AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY, AWS_REGION.
require "json"
require "logger"
require "stringio"
require "rails"
require "active_record/railtie"
require "active_storage/engine"

command, legacy, production = ARGV

def service(bucket)
  {
    "service" => "S3",
    "bucket" => bucket,
    "endpoint" => ENV.fetch("AWS_ENDPOINT_URL"),
    "access_key_id" => ENV.fetch("AWS_ACCESS_KEY_ID"),
    "secret_access_key" => ENV.fetch("AWS_SECRET_ACCESS_KEY"),
    "region" => ENV.fetch("AWS_REGION"),
    "force_path_style" => true,
  }
end

class RoundTrip < Rails::Application
  config.root = __dir__
  config.eager_load = false
  config.logger = Logger.new(nil)
  config.active_record.logger = nil
  config.secret_key_base = "relocator-round-trip"
  config.active_storage.service = :legacy
end
RoundTrip.config.active_storage.service_configurations = {
  "legacy" => service(legacy),
  "production" => service(production),
}
RoundTrip.initialize!

case command
when "upload"
  migration = Gem.loaded_specs["activestorage"].full_gem_path +
    "/db/migrate/20170806125915_create_active_storage_tables.rb"
  require migration
  ActiveRecord::Migration.verbose = false
  CreateActiveStorageTables.new.migrate(:up)
  12.times do |i|
    body = "blob #{i} " * (i * 53 + 1)
    ActiveStorage::Blob.create_and_upload!(
      io: StringIO.new(body), filename: "photo-#{i}.png", content_type: "image/png"
    )
  end
when "check"
  found = Hash.new { |h, k| h[k] = [] }
  ActiveStorage::Blob.order(:id).each do |blob|
    begin
      # `open` checks the bytes against the blob's checksum (ActiveStorage::IntegrityError).
      blob.open { |f| f.read }
      found[blob.service_name] << blob.key
    rescue StandardError => e
      found["unreadable"] << "#{blob.key}: #{e.class}: #{e.message}"
    end
  end
  puts JSON.generate(found)
end
