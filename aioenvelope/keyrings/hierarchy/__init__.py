"""The AWS KMS Hierarchical keyring: branch keys in DynamoDB, data keys wrapped locally."""
