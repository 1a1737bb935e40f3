#!/usr/bin/env python3
"""Lints infra/template.yaml with cfn-lint, transforms the SAM template to
plain CloudFormation offline (aws-sam-translator), and deploys it into the
CloudFormation of a moto server; prints the stack outputs as JSON.

Usage: deploy_check.py MOTO_ENDPOINT [STACK_NAME]
Used by crates/pacloud-aws/tests/infra.rs (which then drives the created
table, queue and bucket with pacloud's adapters).
"""
import io
import json
import os
import subprocess
import sys
import time
import zipfile

import boto3
from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse

here = os.path.dirname(os.path.abspath(__file__))
template_path = os.path.join(here, "template.yaml")
endpoint = sys.argv[1]
stack = sys.argv[2] if len(sys.argv) > 2 else "pacloud"
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
creds = dict(region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing", endpoint_url=endpoint)

lint = subprocess.run([os.path.join(os.path.dirname(sys.executable), "cfn-lint"), template_path], capture_output=True, text=True)
if lint.returncode != 0:
    sys.exit(f"cfn-lint failed:\n{lint.stdout}{lint.stderr}")

# The function's code: a placeholder zip in a code bucket (moto does not run it).
s3 = boto3.client("s3", **creds)
s3.create_bucket(Bucket="pacloud-code")
buf = io.BytesIO()
with zipfile.ZipFile(buf, "w") as z:
    z.writestr("bootstrap", "#!/bin/sh\n")
s3.put_object(Bucket="pacloud-code", Key="lambda.zip", Body=buf.getvalue())

with open(template_path) as f:
    sam = yaml_parse(f.read())
for res in sam["Resources"].values():
    if res.get("Type") == "AWS::Serverless::Function":
        res["Properties"]["CodeUri"] = "s3://pacloud-code/lambda.zip"
params = {}
cfn = transform(sam, params, None)

cf = boto3.client("cloudformation", **creds)
cf.create_stack(
    StackName=stack,
    TemplateBody=json.dumps(cfn),
    Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()],
    Capabilities=["CAPABILITY_IAM"],
)
deadline = time.time() + 60
while True:
    s = cf.describe_stacks(StackName=stack)["Stacks"][0]
    if s["StackStatus"].endswith("_COMPLETE") or s["StackStatus"].endswith("_FAILED") or time.time() > deadline:
        break
    time.sleep(0.5)
if s["StackStatus"] != "CREATE_COMPLETE":
    sys.exit(f"stack status {s['StackStatus']}: {s.get('StackStatusReason')}")
print(json.dumps({o["OutputKey"]: o["OutputValue"] for o in s.get("Outputs", [])}))
