"""Reading -> line protocol -> durable spool -> InfluxDB."""
